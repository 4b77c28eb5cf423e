"""The generator panel: prompt, settings, Stop, results, and the ``/generate`` endpoint."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
from gradio.context import LocalContext

from kit.errors import InvalidRequest, JobCancelled
from kit.generate import MAX_SEED, GenerationJob
from kit.security import admit_job
from kit.services import Services
from kit.ui.common import MODEL_CONCURRENCY_ID, owner_for, visitor_errors
from kit.ui.settings import REUSED_SETTINGS, describe_settings, reusable_settings, settings_from_png

logger = logging.getLogger(__name__)

# Order of the endpoint's parameters. Renaming or removing one breaks API callers.
API_PARAMETERS = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "width",
    "height",
    "num_images",
    "init_image",
    "strength",
)
# Captions of live previews start with this, so Stop can tell a preview from a finished result.
PREVIEW_CAPTION = "Preview"
STOPPED_STATUS = "Stopped. Nothing was saved."
# The handler sends step updates to the page at most this often (seconds). Every yield
# costs Gradio a round of output processing on the server's event loop, which at one yield
# per step would compete with a fast pipeline for the CPU. The progress bar (gr.Progress)
# still moves at every step update the job sends, and a cancel reaches the job through its
# cancel hook, not through a yield.
STATUS_INTERVAL_SECONDS = 0.25
# The handler yields at least this often (seconds), because Gradio closes the handler of a
# visitor who has left only at a yield. The kit's middleware stops such a job as soon as its
# event stream drops, so this is the fallback. API callers, who see no previews, get only these.
KEEPALIVE_SECONDS = 1.0
# How long Stop waits for the stopped handlers to send their last update (seconds). A
# cancelled job ends within one denoising step, so this bounds only a stuck pipeline.
STOP_WAIT_SECONDS = 5.0


@dataclass
class GeneratorPanel:
    inputs: dict[str, gr.components.Component]
    generate_button: gr.Button
    stop_button: gr.Button
    gallery: gr.Gallery
    record: gr.JSON
    status: gr.Markdown
    image_to_image: gr.Accordion
    # Shown when an uploaded source image carries settings saved by this kit.
    offer: gr.Group
    offer_text: gr.Markdown
    offer_button: gr.Button
    offer_settings: gr.State


def build_generator_panel(services: Services) -> GeneratorPanel:
    preset = services.preset
    d, lim = preset.generator.defaults, preset.generator.limits
    shown = set(preset.generator.visitor_parameters)
    multiple = services.models.family.size_multiple

    with gr.Row(equal_height=False, elem_id="generator"):
        with gr.Column(scale=5, min_width=280):
            # One line to start with, so that Enter submits (Shift+Enter adds a line); it grows as text wraps.
            prompt = gr.Textbox(
                label="Prompt",
                placeholder="Describe the image you want, then press Enter",
                lines=1,
                max_lines=6,
                max_length=lim.max_prompt_chars,
                elem_id="prompt",
            )
            with gr.Row(elem_id="generate-buttons"):
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate", scale=3, min_width=120)
                stop_button = gr.Button("Stop", variant="stop", elem_id="stop", scale=1, min_width=80)
            if preset.site.examples:
                gr.Examples(
                    examples=[[e] for e in preset.site.examples],
                    inputs=[prompt],
                    label="Try an example (click to fill the prompt)",
                    elem_id="examples",
                )
            with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
                negative_prompt = gr.Textbox(
                    label="Negative prompt",
                    value=d.negative_prompt,
                    placeholder="What the image should not contain",
                    max_length=lim.max_prompt_chars,
                    visible="negative_prompt" in shown,
                    elem_id="negative-prompt",
                )
                seed = gr.Number(
                    label="Seed (-1 picks one)",
                    value=-1,
                    precision=0,
                    minimum=-1,
                    maximum=MAX_SEED,
                    visible="seed" in shown,
                    elem_id="seed",
                )
                with gr.Row():
                    steps = _slider(
                        lim.min_steps, lim.max_steps, value=d.steps, step=1, label="Steps", visible="steps" in shown,
                        elem_id="steps", min_width=160,
                    )
                    guidance_scale = _slider(
                        0.0,
                        lim.max_guidance_scale,
                        value=d.guidance_scale,
                        step=0.5,
                        label="Guidance scale",
                        visible="guidance_scale" in shown and lim.max_guidance_scale > 0,
                        elem_id="guidance-scale",
                        min_width=160,
                    )
                with gr.Row():
                    width = _slider(
                        lim.min_size, lim.max_size, value=d.width, step=multiple, label="Width (pixels)",
                        visible="width" in shown, elem_id="width", min_width=160,
                    )
                    height = _slider(
                        lim.min_size, lim.max_size, value=d.height, step=multiple, label="Height (pixels)",
                        visible="height" in shown, elem_id="height", min_width=160,
                    )
                num_images = _slider(
                    1, lim.max_num_images, value=d.num_images, step=1, label="Images per job",
                    visible="num_images" in shown, elem_id="num-images",
                )
            with gr.Accordion("Start from an image", open=False, visible="init_image" in shown, elem_id="image-to-image") as image_to_image:
                init_image = gr.Image(
                    label="Source image (optional)",
                    type="filepath",
                    sources=["upload", "clipboard"],
                    elem_id="init-image",
                    height=240,
                    image_mode=None,  # leave decoding to the kit's checked loader
                )
                with gr.Group(visible=False, elem_id="settings-offer") as offer:
                    offer_text = gr.Markdown("")
                    offer_button = gr.Button(
                        "Reuse its settings", variant="primary", size="sm", elem_id="reuse-image-settings"
                    )
                strength = gr.Slider(
                    0.05, 1.0, value=d.strength, step=0.05, label="Strength (how much to change the source image)",
                    elem_id="strength",
                )
        with gr.Column(scale=6, min_width=280):
            status = gr.Markdown(
                "Results appear below, with a live preview while they are made. "
                "When the site is busy, your place in the queue shows there too.",
                elem_id="status",
            )
            gallery = gr.Gallery(
                label="Result",
                columns=2,
                height="auto",
                format="png",
                object_fit="contain",
                interactive=False,
                elem_id="result",
                buttons=["download", "fullscreen"],
            )
            with gr.Accordion("Seeds and settings", open=False, elem_id="details"):
                record = gr.JSON(label="Seeds and settings", show_label=False, elem_id="record")

    inputs = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "width": width,
        "height": height,
        "num_images": num_images,
        "init_image": init_image,
        "strength": strength,
    }
    return GeneratorPanel(
        inputs, generate_button, stop_button, gallery, record, status, image_to_image,
        offer, offer_text, offer_button, gr.State(None),
    )


def _slider(minimum: float, maximum: float, *, value: float, step: float, visible: bool, **kwargs: Any) -> gr.Slider:
    """Return a slider, hidden when the preset fixes the value (Gradio rejects a slider whose minimum equals its maximum)."""
    if minimum >= maximum:
        return gr.Slider(minimum, minimum + step, value=minimum, step=step, visible=False, **kwargs)
    return gr.Slider(minimum, maximum, value=value, step=step, visible=visible, **kwargs)


class SessionJobs:
    """The generate jobs that each browser session's handlers are running.

    Stop uses it to end a visitor's jobs and wait until their handlers are done. The page
    sends Gradio's cancel request only after Stop's reply and applies the job's updates until
    that request returns, so without the wait a preview could land after Stop cleared it.
    """

    def __init__(self) -> None:
        self._jobs: dict[str, set[GenerationJob]] = {}
        self._changed = threading.Condition()

    def add(self, session_hash: str | None, job: GenerationJob) -> Callable[[], None]:
        """Record a running handler's job; return the function its handler calls when it ends."""
        if not session_hash:
            return lambda: None
        with self._changed:
            self._jobs.setdefault(session_hash, set()).add(job)

        def remove() -> None:
            with self._changed:
                jobs = self._jobs.get(session_hash, set())
                jobs.discard(job)
                if not jobs:
                    self._jobs.pop(session_hash, None)
                self._changed.notify_all()

        return remove

    def stop(self, session_hash: str | None, timeout: float = STOP_WAIT_SECONDS) -> list[GenerationJob]:
        """Cancel the session's jobs, wait until their handlers end, and return the jobs."""
        if not session_hash:
            return []
        with self._changed:
            jobs = list(self._jobs.get(session_hash, ()))
        for job in jobs:
            job.cancel()
        with self._changed:
            ended = self._changed.wait_for(lambda: not self._jobs.get(session_hash, set()).intersection(jobs), timeout)
        if not ended:
            logger.warning(
                "timed out after %.1f s waiting for the stopped jobs of session %s to end; their pipeline may be stuck",
                timeout,
                session_hash[:12],
            )
        return jobs


def make_handlers(services: Services, session_jobs: SessionJobs):
    """Return (validator, handler) for the generate event, closed over the services."""

    def validate(
        prompt, negative_prompt, seed, steps, guidance_scale, width, height, num_images, init_image, strength, browser_id,
        request: gr.Request = None,
    ):
        values = dict(zip(API_PARAMETERS, (prompt, negative_prompt, seed, steps, guidance_scale, width, height, num_images, init_image, strength)))
        results = [gr.validate(True, "") for _ in (*API_PARAMETERS, "browser_id")]
        try:
            checked = services.generator.check(values)
            admit_job(services, request, prompt=checked.prompt)
        except InvalidRequest as exc:
            index = API_PARAMETERS.index(exc.parameter) if exc.parameter in API_PARAMETERS else 0
            results[index] = gr.validate(False, exc.message)
        return results

    def generate(
        prompt: str,
        negative_prompt: str,
        seed: float,
        steps: float,
        guidance_scale: float,
        width: float,
        height: float,
        num_images: float,
        init_image: Any = None,
        strength: float = 0.6,
        browser_id: str | None = None,
        request: gr.Request = None,
        progress: gr.Progress = gr.Progress(),
    ):
        """Generate images from a prompt, or from a prompt and a source image.

        Returns the images and a record with the seed of each image, the settings used,
        the model and the gallery entry ids.
        """
        values = dict(zip(API_PARAMETERS, (prompt, negative_prompt, seed, steps, guidance_scale, width, height, num_images, init_image, strength)))
        owner = owner_for(request, browser_id)
        job: GenerationJob | None = None
        # Live previews go to the site's own page only. gradio_client downloads every file in
        # every intermediate output, so previews would cost an API caller a download each.
        wants_previews = _caller_kind(request) == "app"
        with visitor_errors():
            generation_request = services.generator.check(values)
            job = services.generator.start(generation_request, owner, previews=wants_previews)
        session_hash = getattr(request, "session_hash", None)
        remove_hook = services.cancel_hooks.register(session_hash, LocalContext.event_id.get(None), job.cancel)
        remove_job = session_jobs.add(session_hash, job)
        timer = StepTimer()
        waiting_since: float | None = None
        showing_preview = False
        last_status = ""
        last_yield = -math.inf
        try:
            for update in job.progress(poll_seconds=STATUS_INTERVAL_SECONDS):
                status = _status_text(update, progress, timer)
                if update is not None:
                    waiting_since = time.monotonic() if update.kind == "waiting" else None
                elif waiting_since is not None:
                    status = _waiting_text(time.monotonic() - waiting_since)
                preview = _preview_item(update, generation_request.prompt)
                now = time.monotonic()
                if not _update_due(now - last_yield, wants_previews, update, preview, status, last_status):
                    continue
                last_yield = now
                if status is not None:
                    last_status = status
                if not wants_previews:
                    # gr.skip() makes Gradio rebuild the output component and its API schema
                    # (about 2 ms for a Gallery), so API callers get plain empty values.
                    yield None, None, last_status
                    continue
                showing_preview = showing_preview or preview is not None
                yield (
                    preview if preview is not None else gr.skip(),
                    gr.skip(),
                    status if status is not None else gr.skip(),
                )
            try:
                with visitor_errors():
                    result = job.wait()
            except gr.Error as exc:
                # The status line gives the reason the job ended, and a preview must not pass for a result.
                clear = None if showing_preview else gr.skip()
                if wants_previews and isinstance(job.error, JobCancelled):
                    # The visitor pressed Stop or left, so an error toast would tell them nothing new.
                    yield clear, gr.skip(), STOPPED_STATUS
                    return
                yield clear, gr.skip(), f"**Not finished.** {exc.message}"
                raise
            images = _result_images(services, result)
            notes = " ".join(result.notices)
            seeds = ", ".join(str(s) for s in result.seeds)
            summary = f"Done in {result.seconds:.1f} s. Seed{'s' if len(result.seeds) > 1 else ''}: {seeds}. {notes}".strip()
            if result.notices:
                gr.Warning(notes)
            yield images, result.record(), summary
        except GeneratorExit:
            job.cancel()
            raise
        finally:
            remove_hook()
            if not job.finished.is_set():
                job.cancel()
            # Only now, after the last update went out, may Stop reply (see SessionJobs).
            remove_job()

    return validate, generate


class StepTimer:
    """Estimate the seconds left in a job from the pace of the denoising steps seen so far."""

    def __init__(self, clock: Any = time.monotonic):
        self._clock = clock
        self._anchor: tuple[float, int] | None = None

    def seconds_left(self, step: int, total: int) -> float | None:
        now = self._clock()
        # Step 0 arrives before the text encoders run, so the pace is measured from step 1 on.
        if step < 1:
            return None
        if self._anchor is None or step < self._anchor[1]:
            self._anchor = (now, step)
            return None
        started, first_step = self._anchor
        if step == first_step:
            return None
        per_step = (now - started) / (step - first_step)
        return per_step * max(0, total - step)


def _update_due(
    since_last: float, for_page: bool, update: Any, preview: Any, status: str | None, last_status: str
) -> bool:
    """Return whether the handler sends an update now, ``since_last`` seconds after the last one.

    API callers get one every KEEPALIVE_SECONDS. The page also gets each new preview and each
    new status line, with step lines at most every STATUS_INTERVAL_SECONDS.
    """
    if since_last >= KEEPALIVE_SECONDS:
        return True
    if not for_page:
        return False
    if preview is not None:
        return True
    if status is None or status == last_status:
        return False
    is_step = update is not None and update.kind == "step"
    return not is_step or since_last >= STATUS_INTERVAL_SECONDS


def _caller_kind(request: gr.Request | None) -> str:
    """Return the ``x-gradio-user`` header: "app" from the site's page, "api" from gradio_client."""
    headers = getattr(request, "headers", None)
    return (headers.get("x-gradio-user") if headers is not None else None) or ""


def _status_text(update: Any, progress: gr.Progress, timer: StepTimer) -> str | None:
    if update is None:
        return None
    if update.kind == "waiting":
        return "Waiting for the model..."
    if update.kind == "loading":
        progress(None, desc=f"Loading the {update.detail} model")
        return (
            f"**Loading the {update.detail} model.** The first job after the site has been idle waits for this; "
            "later jobs start at once."
        )
    if update.kind == "step":
        if not update.total:
            return None
        progress((update.step, update.total), desc="Denoising", unit="steps")
        text = f"Denoising: step {update.step} of {update.total}"
        left = timer.seconds_left(update.step, update.total)
        if left is not None and update.step < update.total:
            text += f", about {_duration(left)} left"
        return text + "."
    if update.kind == "saving":
        return "Saving to your gallery..."
    if update.kind == "cancelled":
        return STOPPED_STATUS
    return None


def _waiting_text(seconds: float) -> str:
    if seconds < 1:
        return "Waiting for the model..."
    return f"Waiting for the model, which is busy with other jobs (waited {_duration(seconds)} so far)."


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


def image_caption(prompt: str, seed: int | None = None) -> str:
    """Return the caption (and so the alt text) of a result or gallery image: its prompt, cut short."""
    text = " ".join(str(prompt).split())
    if len(text) > 100:
        text = text[:99] + "…"
    if not text:
        text = "Generated image"
    return f"{text} (seed {seed})" if seed is not None else text


def _preview_item(update: Any, prompt: str) -> list[tuple[Any, str]] | None:
    if update is None or getattr(update, "preview", None) is None:
        return None
    caption = f"{PREVIEW_CAPTION} at step {update.step} of {update.total}: {image_caption(prompt)}"
    return [(update.preview, caption)]


def _result_images(services: Services, result: Any) -> list[tuple[Any, str]]:
    prompt = result.settings.get("prompt", "")
    captions = [image_caption(prompt, s) for s in result.seeds]
    if result.entry_ids:
        entries = [services.gallery.get(entry_id, owner="*") for entry_id in result.entry_ids]
        return [(str(e.path), c) for e, c in zip(entries, captions)]
    return list(zip(result.images, captions))


def _is_preview(item: Any) -> bool:
    caption = item[1] if isinstance(item, tuple | list) and len(item) > 1 else None
    return isinstance(caption, str) and caption.startswith(PREVIEW_CAPTION)


def wire_generator(panel: GeneratorPanel, services: Services, browser_state: gr.State, concurrency_limit: int):
    """Wire Generate, Enter in the prompt, Stop and the source-image settings offer; return the two generate events."""
    session_jobs = SessionJobs()
    validate, generate = make_handlers(services, session_jobs)
    inputs = [panel.inputs[name] for name in API_PARAMETERS] + [browser_state]
    outputs = [panel.gallery, panel.record, panel.status]
    common = dict(
        fn=generate,
        inputs=inputs,
        outputs=outputs,
        validator=validate,
        concurrency_id=MODEL_CONCURRENCY_ID,
        concurrency_limit=concurrency_limit,
        show_progress="full",
        show_progress_on=[panel.gallery],
    )
    click_event = panel.generate_button.click(api_name="generate", **common)
    submit_event = panel.inputs["prompt"].submit(api_name="generate_on_enter", api_visibility="private", **common)

    def stop(current: list | None, request: gr.Request):
        # End the jobs before replying, because the page applies their updates until its
        # cancel request, sent after this reply, returns (see SessionJobs).
        jobs = session_jobs.stop(getattr(request, "session_hash", None))
        if jobs and all(job.error is None and job.result is not None for job in jobs):
            # Every job finished before the cancel reached it, so the page keeps its result and status.
            return gr.skip(), gr.skip()
        # A live preview of a stopped job would look like a result; a finished result stays.
        if current and all(_is_preview(item) for item in current):
            return None, STOPPED_STATUS
        return gr.skip(), STOPPED_STATUS

    panel.stop_button.click(
        fn=stop,
        inputs=[panel.gallery],
        outputs=[panel.gallery, panel.status],
        cancels=[click_event, submit_event],
        queue=False,
        api_visibility="private",
    )
    wire_settings_offer(panel, services)
    return click_event, submit_event


# NOTE: Gradio 6.31 shows gr.Info, gr.Warning and gr.Error toasts only for queued events. The
# settings and gallery buttons run unqueued, so that they keep working while the queue is full,
# and report back in a Markdown line (the status line, or one next to the button) instead.
def wire_settings_offer(panel: GeneratorPanel, services: Services) -> None:
    """Offer the settings saved in an uploaded source image, when it is a PNG from this kit."""
    init_image = panel.inputs["init_image"]
    offer_outputs = [panel.offer, panel.offer_text, panel.offer_settings]
    private = dict(queue=False, api_visibility="private")

    def offer(path: str | None):
        parameters = settings_from_png(path) if path else None
        if not parameters:
            return gr.Group(visible=False), "", None
        text = f"This image carries the settings it was made with: {describe_settings(parameters)}."
        return gr.Group(visible=True), text, parameters

    def hide_offer():
        return gr.Group(visible=False), "", None

    init_image.upload(offer, inputs=[init_image], outputs=offer_outputs, **private)
    init_image.clear(hide_offer, outputs=offer_outputs, **private)

    def reuse(parameters: dict | None):
        if not parameters:
            return (*(gr.skip() for _ in REUSED_SETTINGS), *hide_offer(), gr.skip())
        values, note = reuse_updates(parameters, services)
        return (*values, *hide_offer(), reuse_status("Settings copied from the source image", parameters, note))

    panel.offer_button.click(
        reuse,
        inputs=[panel.offer_settings],
        outputs=[*(panel.inputs[name] for name in REUSED_SETTINGS), *offer_outputs, panel.status],
        **private,
    )


def reuse_updates(parameters: dict[str, Any], services: Services) -> tuple[list[Any], str]:
    """Return one value (or ``gr.skip()``) per reused control, and a sentence on values that were adjusted."""
    values, notes = reusable_settings(parameters, services.preset)
    updates = [values[name] if name in values else gr.skip() for name in REUSED_SETTINGS]
    note = ("Adjusted to this site's limits: " + "; ".join(notes) + ".") if notes else ""
    return updates, note


def reuse_status(action: str, parameters: dict[str, Any], note: str = "") -> str:
    """Return the status line shown after settings were copied into the generator."""
    text = f"**{action}:** {describe_settings(parameters)}. Press Generate to make it."
    return f"{text} {note}" if note else text


__all__ = ["API_PARAMETERS", "GeneratorPanel", "build_generator_panel", "image_caption", "reuse_status", "reuse_updates", "wire_generator", "JobCancelled"]
