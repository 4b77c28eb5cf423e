"""The generator panel: prompt, settings, Stop, results, and the ``/generate`` endpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import gradio as gr

from kit.errors import InvalidRequest, JobCancelled
from kit.generate import MAX_SEED, GenerationJob
from kit.services import Services
from kit.ui.common import MODEL_CONCURRENCY_ID, owner_for, visitor_errors

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


@dataclass
class GeneratorPanel:
    inputs: dict[str, gr.components.Component]
    generate_button: gr.Button
    stop_button: gr.Button
    gallery: gr.Gallery
    record: gr.JSON
    status: gr.Markdown


def build_generator_panel(services: Services) -> GeneratorPanel:
    preset = services.preset
    d, lim = preset.generator.defaults, preset.generator.limits
    shown = set(preset.generator.visitor_parameters)
    multiple = services.models.family.size_multiple

    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            prompt = gr.Textbox(
                label="Prompt",
                placeholder="Describe the image you want, then press Enter",
                lines=2,
                max_lines=6,
                max_length=lim.max_prompt_chars,
                elem_id="prompt",
            )
            with gr.Row():
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
            if preset.site.examples:
                gr.Examples(examples=[[e] for e in preset.site.examples], inputs=[prompt], label="Try an example")
            with gr.Accordion("Advanced settings", open=False):
                negative_prompt = gr.Textbox(
                    label="Negative prompt",
                    value=d.negative_prompt,
                    placeholder="What the image should not contain",
                    max_length=lim.max_prompt_chars,
                    visible="negative_prompt" in shown,
                )
                seed = gr.Number(
                    label="Seed (-1 picks one)",
                    value=-1,
                    precision=0,
                    minimum=-1,
                    maximum=MAX_SEED,
                    visible="seed" in shown,
                )
                with gr.Row():
                    steps = gr.Slider(
                        lim.min_steps, lim.max_steps, value=d.steps, step=1, label="Steps", visible="steps" in shown
                    )
                    guidance_scale = gr.Slider(
                        0.0,
                        lim.max_guidance_scale,
                        value=d.guidance_scale,
                        step=0.5,
                        label="Guidance scale",
                        visible="guidance_scale" in shown and lim.max_guidance_scale > 0,
                    )
                with gr.Row():
                    width = gr.Slider(
                        lim.min_size, lim.max_size, value=d.width, step=multiple, label="Width", visible="width" in shown
                    )
                    height = gr.Slider(
                        lim.min_size, lim.max_size, value=d.height, step=multiple, label="Height", visible="height" in shown
                    )
                num_images = gr.Slider(
                    1, lim.max_num_images, value=d.num_images, step=1, label="Images", visible="num_images" in shown
                )
            with gr.Accordion("Start from an image", open=False, visible="init_image" in shown):
                init_image = gr.Image(label="Source image (optional)", type="filepath", sources=["upload", "clipboard"])
                strength = gr.Slider(
                    0.05, 1.0, value=d.strength, step=0.05, label="Strength (how much to change it)"
                )
        with gr.Column(scale=4):
            status = gr.Markdown("", label="status", elem_id="status")
            gallery = gr.Gallery(
                label="Result", columns=2, height="auto", format="png", elem_id="result", buttons=["download", "fullscreen"]
            )
            with gr.Accordion("Details", open=False):
                record = gr.JSON(label="Seeds and settings")

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
    return GeneratorPanel(inputs, generate_button, stop_button, gallery, record, status)


def make_handlers(services: Services):
    """Return (validator, handler) for the generate event, closed over the services."""

    def validate(
        prompt, negative_prompt, seed, steps, guidance_scale, width, height, num_images, init_image, strength, browser_id
    ):
        values = dict(zip(API_PARAMETERS, (prompt, negative_prompt, seed, steps, guidance_scale, width, height, num_images, init_image, strength)))
        results = [gr.validate(True, "") for _ in (*API_PARAMETERS, "browser_id")]
        try:
            services.generator.check(values)
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
        with visitor_errors():
            generation_request = services.generator.check(values)
            job = services.generator.start(generation_request, owner)
        try:
            for update in job.progress():
                status = _status_text(update, progress)
                # Yielding often is what lets Gradio close this generator on cancel.
                yield gr.skip(), gr.skip(), status if status is not None else gr.skip()
            with visitor_errors():
                result = job.wait()
        except GeneratorExit:
            job.cancel()
            raise
        finally:
            if not job.finished.is_set():
                job.cancel()
        images = _result_images(services, result)
        notes = " ".join(result.notices)
        seeds = ", ".join(str(s) for s in result.seeds)
        summary = f"Done in {result.seconds:.1f} s. Seed{'s' if len(result.seeds) > 1 else ''}: {seeds}. {notes}".strip()
        if result.notices:
            gr.Warning(notes)
        yield images, result.record(), summary

    return validate, generate


def _status_text(update: Any, progress: gr.Progress) -> str | None:
    if update is None:
        return None
    if update.kind == "waiting":
        return "Waiting for the model..."
    if update.kind == "loading":
        progress(None, desc=f"Loading the {update.detail} model")
        return f"Loading the {update.detail} model. The first job after a quiet spell takes longer."
    if update.kind == "step":
        if update.total:
            progress((update.step, update.total), desc="Denoising", unit="steps")
        return f"Step {update.step} of {update.total}"
    if update.kind == "saving":
        return "Saving to your gallery..."
    return None


def _result_images(services: Services, result: Any) -> list[tuple[Any, str]]:
    captions = [f"seed {s}" for s in result.seeds]
    if result.entry_ids:
        entries = [services.gallery.get(entry_id, owner="*") for entry_id in result.entry_ids]
        return [(str(e.path), c) for e, c in zip(entries, captions)]
    return list(zip(result.images, captions))


def wire_generator(panel: GeneratorPanel, services: Services, browser_state: gr.State, concurrency_limit: int):
    validate, generate = make_handlers(services)
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
    panel.stop_button.click(
        fn=lambda: "Stopped.",
        outputs=[panel.status],
        cancels=[click_event, submit_event],
        queue=False,
        api_visibility="private",
    )
    return click_event, submit_event


__all__ = ["API_PARAMETERS", "GeneratorPanel", "build_generator_panel", "wire_generator", "JobCancelled"]
