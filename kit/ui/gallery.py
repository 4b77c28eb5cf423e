"""The gallery panel and the ``/gallery`` endpoint: the visitor's images, newest first."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from kit.errors import GalleryError
from kit.gallery import SHARED_OWNER, GalleryEntry, GalleryPage
from kit.services import Services
from kit.ui.common import owner_for, visitor_errors
from kit.ui.generator import image_caption, reuse_status, reuse_updates
from kit.ui.settings import REUSED_SETTINGS, describe_settings, settings_from_png

logger = logging.getLogger(__name__)

# Grid thumbnails are at most this many pixels on their longer side. Smaller images are shown as they are.
THUMBNAIL_SIDE = 256
THUMBNAIL_FOLDER = "thumbs"


@dataclass
class GalleryPanel:
    grid: gr.Gallery
    page: gr.Number
    page_label: gr.Markdown
    previous_button: gr.Button
    next_button: gr.Button
    refresh_button: gr.Button
    detail_box: gr.Column
    detail_image: gr.Image
    detail: gr.JSON
    selected_id: gr.State
    page_ids: gr.State
    reuse_button: gr.Button
    init_image_button: gr.Button
    download_button: gr.DownloadButton
    delete_button: gr.Button
    message: gr.Markdown  # the result of the detail view's buttons, next to them
    restore: gr.File
    restore_message: gr.Markdown

    @property
    def page_outputs(self) -> list[Any]:
        """The components that ``show_page`` fills, in its return order."""
        return [
            self.grid, self.page, self.page_label, self.page_ids, self.selected_id, self.detail,
            self.detail_image, self.download_button, self.detail_box, self.message,
        ]

    @property
    def refresh_outputs(self) -> list[Any]:
        """The components that ``refresh_page`` fills: the grid and paging, not the selected image."""
        return [self.grid, self.page, self.page_label, self.page_ids]


def build_gallery_panel(services: Services) -> GalleryPanel:
    scope = services.preset.gallery.scope
    intro = (
        "Your images, newest first. They are kept in this browser's gallery on this site."
        if scope == "private"
        else "Everyone's images, newest first."
    )
    gr.Markdown(intro, elem_id="gallery-intro")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=280):
            with gr.Row(elem_id="gallery-paging", equal_height=True):
                previous_button = gr.Button("← Newer", size="sm", elem_id="gallery-prev", scale=0, min_width=80)
                page = gr.Number(
                    value=1, precision=0, minimum=1, label="Page", show_label=False, container=False,
                    elem_id="gallery-page", scale=0, min_width=70,
                )
                next_button = gr.Button("Older →", size="sm", elem_id="gallery-next", scale=0, min_width=80)
                refresh_button = gr.Button("Refresh", size="sm", elem_id="gallery-refresh", scale=0, min_width=80)
                page_label = gr.Markdown("", elem_id="gallery-page-label")
            grid = gr.Gallery(
                label="Gallery",
                show_label=False,
                columns=4,
                height="auto",
                object_fit="cover",
                allow_preview=False,
                elem_id="gallery-grid",
                format="png",
            )
        with gr.Column(scale=2, min_width=280, visible=False, elem_id="gallery-detail-box") as detail_box:
            detail_image = gr.Image(
                label="Selected image",
                type="filepath",
                interactive=False,
                buttons=["fullscreen"],
                height=320,
                elem_id="gallery-image",
            )
            with gr.Row():
                reuse_button = gr.Button("Reuse settings", variant="primary", size="sm", elem_id="gallery-reuse", min_width=120)
                init_image_button = gr.Button("Use as img2img source", size="sm", elem_id="gallery-init-image", min_width=120)
            with gr.Row():
                download_button = gr.DownloadButton("Download PNG", size="sm", elem_id="gallery-download", min_width=120)
                delete_button = gr.Button("Delete", variant="stop", size="sm", elem_id="gallery-delete", min_width=120)
            message = gr.Markdown("", elem_id="gallery-message")
            detail = gr.JSON(label="Settings", elem_id="gallery-detail")
    with gr.Accordion("Restore settings from an image", open=False, elem_id="restore-box"):
        restore = gr.File(
            label="Drop a PNG saved from this site to copy its settings into the generator",
            file_types=[".png"],
            type="filepath",
            height=120,
            elem_id="restore-settings",
        )
        restore_message = gr.Markdown("", elem_id="restore-message")
    return GalleryPanel(
        grid, page, page_label, previous_button, next_button, refresh_button, detail_box, detail_image, detail,
        gr.State(None), gr.State([]), reuse_button, init_image_button, download_button, delete_button, message,
        restore, restore_message,
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


def thumbnail_path(images_dir: Path, entry: GalleryEntry, side: int = THUMBNAIL_SIDE) -> Path:
    """Return a small WebP copy of an entry's image for the grid, made on first use.

    Thumbnails live under ``images/thumbs/`` (inside the served folder) and are written under
    a ``.tmp-`` name first, so the gallery's start-up sweep removes any that a crash cut short.
    Images no larger than ``side`` are returned as they are; so is any image that fails.
    """
    width, height = entry.parameters.get("width"), entry.parameters.get("height")
    if isinstance(width, int) and isinstance(height, int) and max(width, height) <= side:
        return entry.path
    target = images_dir / THUMBNAIL_FOLDER / f"{entry.id}.webp"
    if target.is_file():
        return target
    from PIL import Image

    temporary = target.with_name(f".tmp-{uuid.uuid4().hex}.webp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(entry.path) as image:
            image.thumbnail((side, side), Image.Resampling.LANCZOS)
            image.convert("RGB").save(temporary, format="WEBP", quality=82)
        os.replace(temporary, target)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        logger.warning("no thumbnail for gallery entry %s: %s", entry.id, exc)
        return entry.path
    return target


def remove_thumbnail(images_dir: Path, entry_id: str) -> None:
    (images_dir / THUMBNAIL_FOLDER / f"{entry_id}.webp").unlink(missing_ok=True)


def _closed_detail() -> tuple[Any, ...]:
    """Return the detail view's outputs with nothing selected: id, settings, image, file, box, message."""
    return None, None, None, None, gr.Column(visible=False), ""


def entry_details(entry: GalleryEntry) -> dict[str, Any]:
    """Return every saved setting of an entry, with its id and creation time, for the detail view."""
    return {"id": entry.id, **entry.parameters, "created": entry.as_json()["created"]}


def wire_gallery(
    panel: GalleryPanel,
    services: Services,
    browser_state: gr.State,
    generator: Any,
    tabs: gr.Tabs,
    generator_tab_id: str,
) -> None:
    """Wire paging, the detail view and its buttons, restoring settings, and the ``/gallery`` endpoint.

    ``generator`` is the generator's panel: "Reuse settings" and "Use as img2img source" fill its inputs.
    """
    default_page_size = services.preset.gallery.page_size
    images_dir = services.gallery.images_dir
    generator_inputs = generator.inputs

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
        owner = _owner_filter(services, request, browser_id)
        number = max(1, int(page or 1))
        try:
            with visitor_errors():
                result = services.gallery.list(owner, number, default_page_size)
                if number > result.pages:
                    number = result.pages
                    result = services.gallery.list(owner, number, default_page_size)
        except gr.Error as exc:
            return gr.skip(), gr.skip(), f"The gallery could not be read: {exc.message}", gr.skip(), *_closed_detail()
        items = [
            (str(thumbnail_path(images_dir, e)), image_caption(e.parameters.get("prompt", ""))) for e in result.entries
        ]
        plural = "s" if result.total != 1 else ""
        label = f"Page {result.page} of {result.pages} ({result.total} image{plural})"
        if result.total == 0:
            label = "No images yet. Generate one and it will appear here."
        return items, number, label, [e.id for e in result.entries], *_closed_detail()

    def refresh_page(page: float, browser_id: str | None, request: gr.Request):
        return show_page(page, browser_id, request)[:4]

    page_outputs = panel.page_outputs
    private = dict(api_visibility="private", queue=False)

    gr.api(gallery, api_name="gallery", queue=False)

    panel.refresh_button.click(show_page, inputs=[panel.page, browser_state], outputs=page_outputs, **private)
    panel.page.submit(show_page, inputs=[panel.page, browser_state], outputs=page_outputs, **private)

    def newer_page(page: float, browser_id: str | None, request: gr.Request):
        return show_page(max(1, int(page or 1) - 1), browser_id, request)

    def older_page(page: float, browser_id: str | None, request: gr.Request):
        return show_page(int(page or 1) + 1, browser_id, request)

    panel.previous_button.click(newer_page, inputs=[panel.page, browser_state], outputs=page_outputs, **private)
    panel.next_button.click(older_page, inputs=[panel.page, browser_state], outputs=page_outputs, **private)

    detail_outputs = [panel.selected_id, panel.detail, panel.detail_image, panel.download_button, panel.detail_box, panel.message]

    def select(ids: list[str], browser_id: str | None, request: gr.Request, evt: gr.SelectData):
        if evt.index is None or not 0 <= evt.index < len(ids):
            return _closed_detail()
        try:
            with visitor_errors():
                entry = services.gallery.get(ids[evt.index], _owner_filter(services, request, browser_id))
        except gr.Error as exc:
            return (*_closed_detail()[:-1], f"{exc.message} Press Refresh to update the gallery.")
        image = gr.Image(value=str(entry.path), alt_text=image_caption(entry.parameters.get("prompt", "")))
        return entry.id, entry_details(entry), image, str(entry.path), gr.Column(visible=True), ""

    panel.grid.select(select, inputs=[panel.page_ids, browser_state], outputs=detail_outputs, **private)

    def selected_entry(entry_id: str | None, browser_id: str | None, request: gr.Request) -> GalleryEntry:
        """Return the selected entry; raise gr.Error with a message for the visitor when there is none."""
        if not entry_id:
            raise gr.Error("Select an image in the gallery first.", print_exception=False)
        with visitor_errors():
            return services.gallery.get(entry_id, _owner_filter(services, request, browser_id))

    reused_inputs = [generator_inputs[name] for name in REUSED_SETTINGS]

    def reuse(entry_id: str | None, browser_id: str | None, request: gr.Request):
        try:
            entry = selected_entry(entry_id, browser_id, request)
        except gr.Error as exc:
            return (*(gr.skip() for _ in REUSED_SETTINGS), gr.skip(), gr.skip(), exc.message)
        values, note = reuse_updates(entry.parameters, services)
        status = reuse_status("Settings copied from the gallery", entry.parameters, note)
        return (*values, gr.Tabs(selected=generator_tab_id), status, "")

    panel.reuse_button.click(
        reuse,
        inputs=[panel.selected_id, browser_state],
        outputs=[*reused_inputs, tabs, generator.status, panel.message],
        **private,
    )

    def use_as_init_image(entry_id: str | None, prompt: str, browser_id: str | None, request: gr.Request):
        try:
            entry = selected_entry(entry_id, browser_id, request)
        except gr.Error as exc:
            return (*(gr.skip() for _ in range(7)), exc.message)
        values = dict(zip(REUSED_SETTINGS, reuse_updates(entry.parameters, services)[0]))
        # The source keeps its own size; the prompt is filled only when the visitor has none yet.
        new_prompt = values["prompt"] if not (prompt or "").strip() else gr.skip()
        status = (
            "**The gallery image is now the source** in “Start from an image”. "
            "Edit the prompt, choose a strength and press Generate."
        )
        return (
            str(entry.path), new_prompt, values["width"], values["height"],
            gr.Accordion(open=True), gr.Tabs(selected=generator_tab_id), status, "",
        )

    panel.init_image_button.click(
        use_as_init_image,
        inputs=[panel.selected_id, generator_inputs["prompt"], browser_state],
        outputs=[
            generator_inputs["init_image"], generator_inputs["prompt"], generator_inputs["width"],
            generator_inputs["height"], generator.image_to_image, tabs, generator.status, panel.message,
        ],
        **private,
    )

    def delete(entry_id: str | None, page: float, browser_id: str | None, request: gr.Request):
        try:
            if not entry_id:
                raise gr.Error("Select an image in the gallery first.", print_exception=False)
            with visitor_errors():
                services.gallery.delete(entry_id, owner_for(request, browser_id))
        except gr.Error as exc:
            return (*(gr.skip() for _ in page_outputs[:-1]), exc.message)
        remove_thumbnail(images_dir, entry_id)
        return show_page(page, browser_id, request)

    panel.delete_button.click(
        delete, inputs=[panel.selected_id, panel.page, browser_state], outputs=page_outputs, **private
    )

    def restore(path: str | None):
        unchanged = [gr.skip() for _ in REUSED_SETTINGS]
        if not path:
            return (*unchanged, gr.skip(), gr.skip(), gr.skip(), "")
        parameters = settings_from_png(path)
        if not parameters:
            message = (
                "This file carries no settings from this site. "
                "Drop a PNG that was downloaded from the gallery or the results."
            )
            return (*unchanged, None, gr.skip(), gr.skip(), message)
        values, note = reuse_updates(parameters, services)
        status = reuse_status("Settings restored from the image", parameters, note)
        return (*values, None, gr.Tabs(selected=generator_tab_id), status, "")

    panel.restore.upload(
        restore,
        inputs=[panel.restore],
        outputs=[*reused_inputs, panel.restore, tabs, generator.status, panel.restore_message],
        **private,
    )
    # site.py refreshes the grid with these when the tab opens and after each finished job.
    panel.show_page = show_page  # type: ignore[attr-defined]
    panel.refresh_page = refresh_page  # type: ignore[attr-defined]
