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

CSS = """
.gradio-container { max-width: 1200px !important; margin: 0 auto; }
footer { display: none !important; }
#site-header { display: flex; align-items: center; gap: 0.75rem; flex-wrap: wrap; }
#site-header h1 { margin: 0; font-size: 1.75rem; line-height: 1.2; overflow-wrap: anywhere; }
#site-header .site-logo { height: 48px; width: auto; max-width: 160px; object-fit: contain; }
#site-header-box, #site-header-box .html-container, #site-header-box .prose { padding-left: 0 !important; padding-right: 0 !important; }
#site-description { margin-top: -0.25rem; }
/* Errors reach the visitor as toasts with their message (and validation messages on the input);
   the bare "Error" badge that Gradio also puts over the output would add nothing. */
.gradio-container .wrap:has(> span.error) { display: none !important; }
#status { min-height: 2.5em; }
/* Gradio's queue position and timer on the result area: readable, not fine print. */
#result .meta-text, #result .meta-text-center, #result .progress-text {
  font-size: var(--text-md) !important; font-family: var(--font) !important;
}
#status p { margin: 0.25rem 0; }
#site-footer { opacity: 0.8; font-size: 0.875rem; text-align: center; }
#site-footer p { overflow-wrap: anywhere; }
#gallery-page-label p { margin: 0; }
#gallery-paging { align-items: center; flex-wrap: wrap; }
#gallery-page input { text-align: center; }
/* Square thumbnails, as many per row as fit (two on a phone). */
#gallery-grid .grid-container {
  grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)) !important;
  grid-template-rows: none !important; grid-auto-rows: auto !important;
}
#gallery-grid .thumbnail-item { aspect-ratio: 1 / 1; }
/* The grid grows with its page of thumbnails; the page scrolls, not a box inside it. */
#gallery-grid .grid-wrap { min-height: 0 !important; max-height: none !important; overflow-y: auto !important; }
#gallery-image img { width: 100%; height: 100%; object-fit: contain; }
/* Long values (ids, prompts) wrap instead of widening the page. */
#gallery-detail .json-holder, #record .json-holder { max-width: 100%; overflow-x: auto; }
#gallery-detail .line, #record .line { white-space: normal; overflow-wrap: anywhere; }
/* Phones: keep every row inside the screen width. */
@media (max-width: 640px) {
  .gradio-container { padding-left: 8px !important; padding-right: 8px !important; }
  #site-header h1 { font-size: 1.35rem; }
  #site-header .site-logo { height: 36px; }
}
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
    """Build the Blocks for ``services.preset``. Loads no model and touches no GPU.

    Raises PresetError when the preset's logo file cannot be read, so the site fails at start.
    """
    preset = services.preset
    site = preset.site
    concurrency = services.model_concurrency
    header_html = _header_html(site, preset.source)

    with gr.Blocks(title=site.title, analytics_enabled=False) as demo:
        # The visitor id lives in the browser's storage so that it outlives reloads and server
        # restarts; each event reads the session copy, which API clients never see or send.
        stored_id = gr.BrowserState(None, storage_key="microsite-kit-visitor", secret=_browser_secret(services.data_dir))
        browser_state = gr.State(None)
        gr.HTML(header_html, elem_id="site-header-box", padding=False)
        description = site.description
        if notice:
            description += f"\n\n*{notice}*"
        if description.strip():
            gr.Markdown(description, elem_id="site-description")

        first_tab = GALLERY_TAB
        if preset.features.generator:
            first_tab = GENERATOR_TAB
        elif preset.features.describe:
            first_tab = DESCRIBE_TAB
        with gr.Tabs(selected=first_tab, elem_id="feature-tabs") as tabs:
            with gr.Tab("Generate", id=GENERATOR_TAB, visible=preset.features.generator, elem_id="tab-generate"):
                generator = build_generator_panel(services)
            with gr.Tab("Describe", id=DESCRIBE_TAB, visible=preset.features.describe, elem_id="tab-describe"):
                describe = build_describe_panel()
            with gr.Tab("Gallery", id=GALLERY_TAB, visible=preset.features.gallery, elem_id="tab-gallery") as gallery_tab:
                gallery = build_gallery_panel(services)

        footer_text = site.footer + (" · " if site.footer else "") + f"Model: {preset.generator.model}"
        footer = gr.Markdown(_footer(services, footer_text), elem_id="site-footer")

        click_event, submit_event = wire_generator(generator, services, browser_state, concurrency)
        wire_describe(describe, services, generator.inputs["prompt"], tabs, GENERATOR_TAB, concurrency)
        wire_gallery(gallery, services, browser_state, generator, tabs, GENERATOR_TAB)

        page_inputs = [gallery.page, browser_state]
        private = dict(queue=False, api_visibility="private")
        # Opening the tab and finishing a job refresh the grid; a selected image stays selected.
        gallery_tab.select(gallery.refresh_page, inputs=page_inputs, outputs=gallery.refresh_outputs, **private)
        for event in (click_event, submit_event):
            event.success(gallery.refresh_page, inputs=page_inputs, outputs=gallery.refresh_outputs, **private)

        def on_load(browser_id: str | None):
            visitor = new_browser_id(browser_id)
            return visitor, visitor, _footer(services, footer_text)

        demo.load(on_load, inputs=[stored_id], outputs=[stored_id, browser_state, footer], **private)
    return demo


def _footer(services: Services, text: str) -> str:
    """Return the footer line: the preset's text and model, the memory plan and a link to the API page."""
    return f"{text} · Memory: {services.models.last_plan_summary} · [Use the API](?view=api)"


# Logos are embedded in the page as data URLs, so no extra folder has to be served.
_LOGO_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif", ".svg": "image/svg+xml"}
MAX_LOGO_BYTES = 512 * 1024


def _logo_src(logo: str, preset_source: str) -> str:
    """Return an ``img`` src for the preset's logo: an http(s) URL as it is, or a local file as a data URL.

    A relative path is read from the preset file's folder. Raises PresetError when the file
    is missing, too large or not an image type that browsers show.
    """
    import base64

    from kit.errors import PresetError

    if logo.startswith(("https://", "http://")):
        return logo
    path = Path(logo).expanduser()
    if not path.is_absolute():
        source = Path(preset_source)
        path = (source.parent if source.is_file() else Path.cwd()) / path
    problem = None
    if path.suffix.lower() not in _LOGO_TYPES:
        problem = f"use a {', '.join(sorted(_LOGO_TYPES))} file or an https:// URL"
    elif not path.is_file():
        problem = f"file {path} not found"
    elif path.stat().st_size > MAX_LOGO_BYTES:
        problem = f"file {path} is {path.stat().st_size:,} bytes; the limit is {MAX_LOGO_BYTES:,}"
    if problem:
        raise PresetError(f"invalid preset {preset_source}:\n  site.logo = {logo!r}: {problem}")
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"data:{_LOGO_TYPES[path.suffix.lower()]};base64,{encoded}"


def _header_html(site: Any, preset_source: str) -> str:
    """Return the page header: logo (if any) and title, plus the accent colour when it is a hex value."""
    parts = ['<div id="site-header">']
    if site.logo:
        # The title sits next to the logo, so the logo is decorative for screen readers.
        parts.append(f'<img class="site-logo" src="{html.escape(_logo_src(site.logo, preset_source))}" alt="">')
    parts.append(f"<h1>{html.escape(site.title)}</h1></div>")
    if site.accent_color.startswith("#"):
        # launch_options gives the theme named hues only, so a hex accent overrides its primary colours here.
        color = site.accent_color
        parts.append(
            "<style>.gradio-container {"
            f" --color-accent: {color}; --color-accent-soft: {color}1a;"
            f" --button-primary-background-fill: {color}; --button-primary-background-fill-hover: {color}dd;"
            f" --button-primary-border-color: {color}; --slider-color: {color};"
            f" --checkbox-background-color-selected: {color}; --loader-color: {color}; --link-text-color: {color};"
            f" --block-title-text-color: {color}; --block-title-background-fill: {color}1a;"
            f" --block-label-text-color: {color}; --block-label-background-fill: {color}1a; }}</style>"
        )
    return "".join(parts)


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
    return {
        "max_size": services.preset.queue.max_size,
        "default_concurrency_limit": 1,
        "status_update_rate": services.preset.queue.status_update_rate,
        # Off: the /gradio_api/run/NAME route would run queued events directly, skipping the
        # queue's size limit and the validators that hold the kit's checks and job limits.
        "api_open": False,
    }


def launch_options(services: Services) -> dict[str, Any]:
    """Return the keyword arguments for ``Blocks.launch`` that this site needs."""
    site = services.preset.site
    theme = _THEMES[site.theme](primary_hue=site.accent_color if not site.accent_color.startswith("#") else "indigo")
    options: dict[str, Any] = {
        "theme": theme,
        "css": CSS,
        "ssr_mode": False,
        "show_error": False,
        "favicon_path": None,
    }
    options.update(security_options(services))
    return options


_STATIC_FOLDERS: set[Path] = set()


def security_options(services: Services) -> dict[str, Any]:
    """Return the launch options that enforce the preset's ``[security]`` section.

    The kit's middleware (health check, access control on every route, file policy, image
    input checks) and the sweep of Gradio's temporary folder go in through ``app_kwargs``,
    because Gradio creates the FastAPI app inside ``launch`` and Starlette accepts no
    middleware once the app has started.
    """
    from starlette.middleware import Middleware

    from kit.security import guard_for
    from kit.security.files import temp_cleanup_lifespan
    from kit.security.middleware import SiteGuardMiddleware

    guard = guard_for(services)
    settings = services.preset.security
    app_kwargs: dict[str, Any] = {"middleware": [Middleware(SiteGuardMiddleware, guard=guard, cancel_hooks=services.cancel_hooks)]}
    if settings.temp_max_age_seconds:
        app_kwargs["lifespan"] = temp_cleanup_lifespan(settings.temp_max_age_seconds)
    # Gallery images are served from where the gallery wrote them, not copied into Gradio's
    # cache first. Gradio keeps one list of static folders per process and appends to it on
    # every call, so each folder is added once.
    images_dir = Path(services.gallery.images_dir).resolve()
    if images_dir not in _STATIC_FOLDERS:
        gr.set_static_paths([images_dir])
        _STATIC_FOLDERS.add(images_dir)
    options: dict[str, Any] = {
        # Only the gallery images are served from disk, besides Gradio's own temporary folder.
        "allowed_paths": [str(services.gallery.images_dir)],
        "blocked_paths": guard.blocked_paths(),
        "max_file_size": guard.max_upload_bytes,
        "app_kwargs": app_kwargs,
    }
    if guard.access_control:
        options["auth"] = guard.check_login
    return options
