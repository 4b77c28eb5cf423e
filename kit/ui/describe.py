"""The describe panel: upload an image, get a caption, send it to the prompt box."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from kit.errors import InvalidRequest
from kit.services import Services
from kit.ui.common import MODEL_CONCURRENCY_ID, visitor_errors


@dataclass
class DescribePanel:
    image: gr.Image
    describe_button: gr.Button
    caption: gr.Textbox
    use_as_prompt_button: gr.Button


def build_describe_panel() -> DescribePanel:
    with gr.Row(equal_height=False):
        with gr.Column():
            image = gr.Image(label="Image to describe", type="filepath", sources=["upload", "clipboard"], elem_id="describe-image")
            describe_button = gr.Button("Describe", variant="primary", elem_id="describe")
        with gr.Column():
            caption = gr.Textbox(label="Description", lines=3, interactive=True, elem_id="caption")
            use_as_prompt_button = gr.Button("Use as prompt", elem_id="use-as-prompt")
    return DescribePanel(image, describe_button, caption, use_as_prompt_button)


def wire_describe(
    panel: DescribePanel, services: Services, prompt: gr.Textbox, tabs: gr.Tabs, generator_tab_id: str, concurrency_limit: int
) -> None:
    def validate(image: Any):
        try:
            services.describer.check(image)
        except InvalidRequest as exc:
            return [gr.validate(False, exc.message)]
        return [gr.validate(True, "")]

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

    def use_as_prompt(caption: str):
        if not caption or not caption.strip():
            raise gr.Error("Describe an image first; there is no description to use yet.", print_exception=False)
        return caption.strip(), gr.Tabs(selected=generator_tab_id)

    panel.use_as_prompt_button.click(
        use_as_prompt, inputs=[panel.caption], outputs=[prompt, tabs], queue=False, api_visibility="private"
    )
