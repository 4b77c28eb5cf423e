"""Compose a preset's microsite: a ``gr.Blocks`` plus the options it must be launched with."""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from kit.services import Services
from kit.ui.common import new_browser_id
from kit.ui.describe import build_describe_panel, wire_describe
from kit.ui.gallery import build_gallery_panel, wire_gallery
from kit.ui.generator import build_generator_panel, wire_generator

logger = logging.getLogger(__name__)

GENERATOR_TAB = "generate"
DESCRIBE_TAB = "describe"
GALLERY_TAB = "gallery"
MAX_UPLOAD = "20mb"

CSS = """
.gradio-container { max-width: 1200px !important; margin: 0 auto; }
#status { min-height: 1.5em; }
footer { display: none !important; }
"""

_THEMES = {
    "soft": gr.themes.Soft,
    "default": gr.themes.Default,
    "base": gr.themes.Base,
    "glass": gr.themes.Glass,
    "monochrome": gr.themes.Monochrome,
    "ocean": gr.themes.Ocean,
    "citrus": gr.themes.Citrus,
    "origin": gr.themes.Origin,
}


def build(services: Services, *, notice: str = "") -> gr.Blocks:
    """Build the Blocks for ``services.preset``. Loads no model and touches no GPU."""
    preset = services.preset
    site = preset.site
    concurrency = services.models.replica_count * preset.queue.concurrency_per_replica

    with gr.Blocks(title=site.title, analytics_enabled=False) as demo:
        # The visitor id lives in the browser's storage so that it outlives reloads and server
        # restarts; each event reads the session copy, which API clients never see or send.
        stored_id = gr.BrowserState(None, storage_key="microsite-kit-visitor", secret=_browser_secret(services.data_dir))
        browser_state = gr.State(None)
        header = f"# {html.escape(site.title)}\n{site.description}"
        if notice:
            header += f"\n\n*{notice}*"
        gr.Markdown(header, elem_id="site-header")

        with gr.Tabs(selected=GENERATOR_TAB) as tabs:
            with gr.Tab("Generate", id=GENERATOR_TAB, visible=preset.features.generator):
                generator = build_generator_panel(services)
            with gr.Tab("Describe", id=DESCRIBE_TAB, visible=preset.features.describe):
                describe = build_describe_panel()
            with gr.Tab("Gallery", id=GALLERY_TAB, visible=preset.features.gallery) as gallery_tab:
                gallery = build_gallery_panel(services)

        footer_text = site.footer + (" · " if site.footer else "") + f"Model: {preset.generator.model}"
        footer = gr.Markdown(footer_text, elem_id="site-footer")

        wire_generator(generator, services, browser_state, concurrency)
        wire_describe(describe, services, generator.inputs["prompt"], tabs, GENERATOR_TAB, concurrency)
        wire_gallery(gallery, services, browser_state, generator.inputs, tabs, GENERATOR_TAB)

        page_outputs = [gallery.grid, gallery.page, gallery.page_label, gallery.page_ids, gallery.selected_id, gallery.detail]
        gallery_tab.select(gallery.show_page, inputs=[gallery.page, browser_state], outputs=page_outputs, queue=False, api_visibility="private")
        generator.gallery.change(
            gallery.show_page, inputs=[gallery.page, browser_state], outputs=page_outputs, queue=False, api_visibility="private"
        )

        def on_load(browser_id: str | None):
            visitor = new_browser_id(browser_id)
            return visitor, visitor, _footer(services, footer_text)

        demo.load(
            on_load, inputs=[stored_id], outputs=[stored_id, browser_state, footer], queue=False, api_visibility="private"
        )
    return demo


def _footer(services: Services, text: str) -> str:
    return f"{text} · Memory: {services.models.last_plan_summary}"


def _browser_secret(data_dir: Path) -> str:
    """Return the key that encrypts the visitor id in browser storage, kept across restarts.

    A new key on every start would make every returning visitor look new, and their private
    gallery would seem empty after a restart.
    """
    path = Path(data_dir) / "browser-state.key"
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    import secrets

    key = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(key + "\n", encoding="utf-8")
    path.chmod(0o600)
    return key


def queue_options(services: Services) -> dict[str, Any]:
    return {"max_size": services.preset.queue.max_size, "default_concurrency_limit": 1, "status_update_rate": services.preset.queue.status_update_rate}


def launch_options(services: Services) -> dict[str, Any]:
    """Return the keyword arguments for ``Blocks.launch`` that this site needs."""
    site = services.preset.site
    theme = _THEMES[site.theme](primary_hue=site.accent_color if not site.accent_color.startswith("#") else "indigo")
    return {
        "theme": theme,
        "css": CSS,
        "allowed_paths": [str(services.gallery.images_dir)],
        "max_file_size": MAX_UPLOAD,
        "ssr_mode": False,
        "show_error": False,
        "favicon_path": None,
    }
