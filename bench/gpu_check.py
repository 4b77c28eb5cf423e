"""GPU check: measured peak VRAM and seconds per image of SDXL and SD-Turbo under each placement strategy.

Builds both pipelines at full size with random float16 weights from the architecture configs
in kit/architectures, so nothing is downloaded. For each strategy (gpu, model_offload,
sequential_offload) it places them with the kit's own ``apply_plan`` and runs one job at
the preset's default size, steps and guidance. Random weights draw noise, but every layer runs
at full size, so memory and time match the real models. Prints a markdown table beside the
planner's estimated peak and writes it to the "GPU check" section of docs/benchmarks.md.
Without CUDA it prints a message and exits 0 without writing anything.

    python bench/gpu_check.py [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (preset name, architecture folder, VAE architecture folder or None for the pipeline's own)
CASES = (("sdxl", "sdxl-base-1.0", "sdxl-vae-fp16-fix"), ("sd-turbo", "sd-turbo", None))
STRATEGIES = ("gpu", "model_offload", "sequential_offload")
DEVICE = "cuda:0"
PROMPT = "a lighthouse at dusk, oil painting"


def build_pipeline(folder_name: str, vae_folder: str | None):
    """Build a pipeline with random float16 weights from its configs; the weights end in CPU memory."""
    import diffusers
    import torch

    from kit.architectures import ARCHITECTURES_DIR, _build_module
    from kit.tiny import _clip_tokenizer

    folder = ARCHITECTURES_DIR / folder_name
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    components: dict = {}
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        # Random initialisation runs on the GPU because it is slow on the CPU: building SD-Turbo
        # this way on a shared 2-core CPU took 31 s.
        with torch.device(DEVICE):
            for name, entry in index.items():
                if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
                    continue
                library, class_name = entry
                if name.startswith("tokenizer"):
                    components[name] = _clip_tokenizer()  # a small vocabulary; only token ids matter here
                elif name == "scheduler":
                    components[name] = diffusers.EulerDiscreteScheduler(timestep_spacing="trailing", steps_offset=1)
                elif name == "vae" and vae_folder:
                    components[name] = _build_module("diffusers", "AutoencoderKL", ARCHITECTURES_DIR / vae_folder)
                else:
                    components[name] = _build_module(library, class_name, folder / name)
    finally:
        torch.set_default_dtype(previous_dtype)
    for name, component in components.items():
        if isinstance(component, torch.nn.Module):
            components[name] = component.to("cpu").eval()
    if "safety_checker" in index:
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = getattr(diffusers, index["_class_name"])(**components)
    pipe.set_progress_bar_config(disable=True)
    torch.cuda.empty_cache()
    return pipe


def estimated_plan(pipe, preset, strategy: str):
    from kit.families import FAMILIES
    from kit.memory import component_sizes, cuda_free_bytes, plan_placement

    d = preset.generator.defaults
    return plan_placement(
        component_sizes(pipe, None),
        [],  # the check runs no captioner
        family=FAMILIES[preset.generator.family],
        width=d.width,
        height=d.height,
        num_images=d.num_images,
        guidance=d.guidance_scale > 1.0,
        device=DEVICE,
        free_bytes=cuda_free_bytes(DEVICE),
        dtype="float16",
        forced=strategy,
        headroom_fraction=preset.memory.headroom_fraction,
        vae_tiling_pixels=preset.memory.vae_tiling_pixels,
        vae_fp16_fix=bool(preset.generator.vae),
    )


def run_job(pipe, preset, steps: int) -> float:
    """Run one job at the preset's default size and guidance; return its seconds."""
    import torch

    d = preset.generator.defaults
    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        pipe(
            prompt=PROMPT,
            num_inference_steps=steps,
            guidance_scale=d.guidance_scale,
            width=d.width,
            height=d.height,
            num_images_per_prompt=d.num_images,
            generator=torch.Generator("cpu").manual_seed(0),
        )
    torch.cuda.synchronize()
    return time.perf_counter() - started


def check_case(preset_name: str, folder_name: str, vae_folder: str | None) -> list[str]:
    import torch

    from kit.memory import format_gib
    from kit.models import apply_plan
    from kit.presets import load_preset

    preset = load_preset(preset_name)
    d = preset.generator.defaults
    pipe = build_pipeline(folder_name, vae_folder)
    rows = []
    # Sequential offload runs last because its hooks are the hardest to undo.
    for strategy in STRATEGIES:
        plan = estimated_plan(pipe, preset, strategy)
        apply_plan({"text2image": pipe}, plan, DEVICE)
        run_job(pipe, preset, steps=1)  # first call: kernel selection and allocator growth
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        seconds = run_job(pipe, preset, steps=d.steps)
        peak = torch.cuda.max_memory_allocated(DEVICE)
        rows.append(
            f"| {preset_name} | {strategy} | {d.width}x{d.height}, {d.steps} steps, guidance {d.guidance_scale:g} "
            f"| {format_gib(peak)} | {format_gib(plan.peak_bytes)} | {seconds / d.num_images:.2f} |"
        )
        print(rows[-1], flush=True)
        pipe.remove_all_hooks()
        if strategy == "gpu":
            pipe.to("cpu")
        torch.cuda.empty_cache()
    del pipe
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md", help="markdown file whose GPU check section is replaced")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("CUDA is not available, so the GPU check measured nothing and wrote nothing. Run it on a machine with an NVIDIA GPU.")
        return 0

    import diffusers

    from bench.report import write_section

    header = [
        "| preset | strategy | job | peak VRAM, measured | peak, planner estimate | seconds per image |",
        "|---|---|---|---|---|---|",
    ]
    rows = [row for case in CASES for row in check_case(*case)]
    body = "\n".join(
        [
            f"`python bench/gpu_check.py` on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}.",
            "Random float16 weights at full size, generator only (no captioner). Peak VRAM is "
            "`torch.cuda.max_memory_allocated` during one job after a one-step warm-up call; the "
            "estimate is the kit's planner for the same strategy, which adds a 0.5 GiB runtime reserve.",
            "",
            *header,
            *rows,
        ]
    )
    print("\n".join([*header, *rows]))
    write_section(args.out, "GPU check", body)
    print(f"wrote the GPU check section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
