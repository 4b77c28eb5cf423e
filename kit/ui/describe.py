"""The describe panel: upload an image, get a caption, send it to the prompt box."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from kit.errors import InvalidRequest
from kit.security import admit_job
from kit.services import Services
from kit.ui.common import MODEL_CONCURRENCY_ID, visitor_errors


@dataclass
class DescribePanel:
    image: gr.Image
    describe_button: gr.Button
    caption: gr.Textbox
    use_as_prompt_button: gr.Button
    message: gr.Markdown  # why "Use as prompt" did nothing, next to the button


def build_describe_panel() -> DescribePanel:
    gr.Markdown("Upload an image to get a description. Edit it if you like, then send it to the prompt.")
    with gr.Row(equal_height=False):
        with gr.Column(min_width=280):
            image = gr.Image(
                label="Image to describe",
                type="filepath",
                sources=["upload", "clipboard"],
                elem_id="describe-image",
                height=320,
                # Without image_mode=None Gradio decodes and converts every upload in full before
                # the kit's header check can reject an oversized one.
                image_mode=None,
            )
            describe_button = gr.Button("Describe", variant="primary", elem_id="describe")
        with gr.Column(min_width=280):
            caption = gr.Textbox(
                label="Description", lines=3, interactive=True, placeholder="The description appears here.", elem_id="caption"
            )
            use_as_prompt_button = gr.Button("Use as prompt", elem_id="use-as-prompt")
            message = gr.Markdown("", elem_id="describe-message")
    return DescribePanel(image, describe_button, caption, use_as_prompt_button, message)


def wire_describe(
    panel: DescribePanel, services: Services, prompt: gr.Textbox, tabs: gr.Tabs, generator_tab_id: str, concurrency_limit: int
) -> None:
    def validate(image: Any, request: gr.Request = None):
        # One input, so one gr.validate: Gradio would read a list as that input's value and pass it.
        try:
            services.describer.check(image)
            admit_job(services, request, parameter="image")
        except InvalidRequest as exc:
            return gr.validate(False, exc.message)
        return gr.validate(True, "")

    def describe(image: Any) -> str:
        """Describe an image in words that can be used as a prompt."""
        with visitor_errors():
            return services.describer.describe(image)

    panel.describe_button.click(
        describe,
        inputs=[panel.image],
        outputs=[panel.caption],
        api_name="describe",
        validator=validate,
        concurrency_id=MODEL_CONCURRENCY_ID,
        concurrency_limit=concurrency_limit,
    )

    # Unqueued, so it works while the queue is full; Gradio shows no toast for unqueued events,
    # so the reason it did nothing goes in the message line under the button.
    def use_as_prompt(caption: str):
        if not caption or not caption.strip():
            return gr.skip(), gr.skip(), "Describe an image first; there is no description to use yet."
        return caption.strip(), gr.Tabs(selected=generator_tab_id), ""

    panel.use_as_prompt_button.click(
        use_as_prompt, inputs=[panel.caption], outputs=[prompt, tabs, panel.message], queue=False, api_visibility="private"
    )
