"""The gallery panel and the ``/gallery`` endpoint: the visitor's images, newest first."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import gradio as gr

from kit.errors import GalleryError
from kit.gallery import SHARED_OWNER, GalleryPage
from kit.services import Services
from kit.ui.common import owner_for, visitor_errors

logger = logging.getLogger(__name__)

# Settings that "Reuse settings" copies back into the generator, in the generator's names.
REUSED_SETTINGS = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height")


@dataclass
class GalleryPanel:
    grid: gr.Gallery
    page: gr.Number
    page_label: gr.Markdown
    previous_button: gr.Button
    next_button: gr.Button
    refresh_button: gr.Button
    detail: gr.JSON
    selected_id: gr.State
    page_ids: gr.State
    reuse_button: gr.Button
    delete_button: gr.Button


def build_gallery_panel(services: Services) -> GalleryPanel:
    scope = services.preset.gallery.scope
    intro = "Your images, newest first." if scope == "private" else "Everyone's images, newest first."
    gr.Markdown(intro)
    grid = gr.Gallery(label="Gallery", columns=4, height="auto", allow_preview=False, elem_id="gallery-grid", format="png")
    with gr.Row():
        previous_button = gr.Button("Newer", size="sm", elem_id="gallery-prev")
        page = gr.Number(value=1, precision=0, minimum=1, label="Page", elem_id="gallery-page", scale=0, min_width=90)
        next_button = gr.Button("Older", size="sm", elem_id="gallery-next")
        refresh_button = gr.Button("Refresh", size="sm", elem_id="gallery-refresh")
    page_label = gr.Markdown("")
    with gr.Group():
        detail = gr.JSON(label="Selected image settings", elem_id="gallery-detail")
        with gr.Row():
            reuse_button = gr.Button("Reuse settings", elem_id="gallery-reuse")
            delete_button = gr.Button("Delete", variant="stop", elem_id="gallery-delete")
    return GalleryPanel(
        grid, page, page_label, previous_button, next_button, refresh_button, detail,
        gr.State(None), gr.State([]), reuse_button, delete_button,
    )


def _owner_filter(services: Services, request: gr.Request | None, browser_id: str | None) -> str:
    if services.preset.gallery.scope == "shared":
        return SHARED_OWNER
    return owner_for(request, browser_id)


def file_url(path: Any) -> str:
    return f"/gradio_api/file={path}"


def page_as_json(page: GalleryPage) -> dict[str, Any]:
    entries = []
    for entry in page.entries:
        item = entry.as_json()
        item["image"] = file_url(entry.path)
        entries.append(item)
    return {"page": page.page, "pages": page.pages, "page_size": page.page_size, "total": page.total, "entries": entries}


def wire_gallery(
    panel: GalleryPanel,
    services: Services,
    browser_state: gr.State,
    generator_inputs: dict[str, gr.components.Component],
    tabs: gr.Tabs,
    generator_tab_id: str,
) -> None:
    default_page_size = services.preset.gallery.page_size

    def gallery(page: int = 1, page_size: int = default_page_size, request: gr.Request = None) -> dict:
        """List the caller's gallery entries, newest first, one page at a time.

        A signed-in caller sees their own entries; an anonymous script sees the entries its
        client session made (or every entry when the site's gallery is shared).
        """
        with visitor_errors():
            number, size = int(page or 1), int(page_size or default_page_size)
            if number < 1:
                raise GalleryError(f"page must be 1 or more, got {number}")
            if not 1 <= size <= 200:
                raise GalleryError(f"page_size must be between 1 and 200, got {size}")
            return page_as_json(services.gallery.list(_owner_filter(services, request, None), number, size))

    def show_page(page: float, browser_id: str | None, request: gr.Request):
        with visitor_errors():
            owner = _owner_filter(services, request, browser_id)
            number = max(1, int(page or 1))
            result = services.gallery.list(owner, number, default_page_size)
            if number > result.pages:
                number = result.pages
                result = services.gallery.list(owner, number, default_page_size)
        items = [(str(e.path), e.parameters.get("prompt", "")[:80]) for e in result.entries]
        label = f"Page {result.page} of {result.pages} ({result.total} image{'s' if result.total != 1 else ''})"
        if result.total == 0:
            label = "No images yet. Generate one and it will appear here."
        return items, number, label, [e.id for e in result.entries], None, None

    page_outputs = [panel.grid, panel.page, panel.page_label, panel.page_ids, panel.selected_id, panel.detail]

    gr.api(gallery, api_name="gallery", queue=False)

    panel.refresh_button.click(show_page, inputs=[panel.page, browser_state], outputs=page_outputs, api_visibility="private", queue=False)
    panel.page.submit(show_page, inputs=[panel.page, browser_state], outputs=page_outputs, api_visibility="private", queue=False)
    def newer_page(page: float, browser_id: str | None, request: gr.Request):
        return show_page(max(1, int(page or 1) - 1), browser_id, request)

    def older_page(page: float, browser_id: str | None, request: gr.Request):
        return show_page(int(page or 1) + 1, browser_id, request)

    panel.previous_button.click(
        newer_page, inputs=[panel.page, browser_state], outputs=page_outputs, api_visibility="private", queue=False
    )
    panel.next_button.click(
        older_page, inputs=[panel.page, browser_state], outputs=page_outputs, api_visibility="private", queue=False
    )

    def select(ids: list[str], browser_id: str | None, request: gr.Request, evt: gr.SelectData):
        if evt.index is None or not 0 <= evt.index < len(ids):
            return None, None
        with visitor_errors():
            entry = services.gallery.get(ids[evt.index], _owner_filter(services, request, browser_id))
        return entry.id, {"id": entry.id, **entry.parameters, "created": entry.as_json()["created"]}

    panel.grid.select(select, inputs=[panel.page_ids, browser_state], outputs=[panel.selected_id, panel.detail], api_visibility="private", queue=False)

    def reuse(entry_id: str | None, browser_id: str | None, request: gr.Request):
        if not entry_id:
            raise gr.Error("Select an image in the gallery first.", print_exception=False)
        with visitor_errors():
            settings = services.gallery.get(entry_id, _owner_filter(services, request, browser_id)).parameters
        values = [settings.get(name, gr.skip()) for name in REUSED_SETTINGS]
        return (*values, gr.Tabs(selected=generator_tab_id))

    panel.reuse_button.click(
        reuse,
        inputs=[panel.selected_id, browser_state],
        outputs=[*(generator_inputs[name] for name in REUSED_SETTINGS), tabs],
        api_visibility="private",
        queue=False,
    )

    def delete(entry_id: str | None, page: float, browser_id: str | None, request: gr.Request):
        if not entry_id:
            raise gr.Error("Select an image in the gallery first.", print_exception=False)
        with visitor_errors():
            services.gallery.delete(entry_id, owner_for(request, browser_id))
        return show_page(page, browser_id, request)

    panel.delete_button.click(
        delete, inputs=[panel.selected_id, panel.page, browser_state], outputs=page_outputs, api_visibility="private", queue=False
    )
    panel.show_page = show_page  # type: ignore[attr-defined]  # used by site.py to refresh after jobs
