"""The baseline: a Gradio app written the way a typical Hugging Face Space calls a pipeline.

It loads the pipeline at import, runs it in a plain function under Gradio's default queue,
and returns a PIL image. BENCH_STEP_LOG names a file that gets one line per denoising step,
so the benchmark can count the steps that run after a cancel; nothing else is added.
"""

import argparse
import os
import time

import gradio as gr
import torch
from diffusers import AutoPipelineForText2Image

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--port", type=int, default=7861)
args = parser.parse_args()

pipe = AutoPipelineForText2Image.from_pretrained(args.model)
step_log = os.environ.get("BENCH_STEP_LOG")


def count_step(pipeline, step, timestep, callback_kwargs):
    if step_log:
        with open(step_log, "a") as log:
            log.write(f"{time.time()}\n")
    return callback_kwargs


def infer(prompt, seed, steps, guidance_scale, width, height):
    generator = torch.Generator().manual_seed(int(seed))
    return pipe(
        prompt,
        num_inference_steps=int(steps),
        guidance_scale=guidance_scale,
        width=int(width),
        height=int(height),
        generator=generator,
        callback_on_step_end=count_step,
    ).images[0]


demo = gr.Interface(
    infer,
    inputs=[gr.Textbox(), gr.Number(0), gr.Number(8), gr.Number(5.0), gr.Number(64), gr.Number(64)],
    outputs=gr.Image(format="png"),
    api_name="generate",
)
demo.queue().launch(server_name="127.0.0.1", server_port=args.port, ssr_mode=False)
