"""The floor: a Gradio app that returns a ready-made image of the requested size, with no model."""

import argparse

import gradio as gr
from PIL import Image

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, default=7862)
args = parser.parse_args()


def generate(prompt, seed, steps, guidance_scale, width, height):
    return Image.new("RGB", (int(width), int(height)), (int(seed) % 256, 64, 128))


demo = gr.Interface(
    generate,
    inputs=[gr.Textbox(), gr.Number(0), gr.Number(8), gr.Number(5.0), gr.Number(64), gr.Number(64)],
    outputs=gr.Image(format="png"),
    api_name="generate",
)
demo.queue(default_concurrency_limit=16).launch(server_name="127.0.0.1", server_port=args.port, ssr_mode=False)
