"""`python -m kit plan`: show where a preset's models would live on a GPU of a given size.

Sizes come from the architecture configs (``kit.architectures``) built on the meta device,
so nothing is downloaded. Built-in models (``builtin:...``) are built into a temporary
folder with ``kit.tiny`` and counted there.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
from pathlib import Path

from kit.errors import KitError
from kit.families import FAMILIES, ModelFamily, family_for_pipeline_class
from kit.memory import (
    DEFAULT_VAE_TILE_SIZE,
    DTYPE_BYTES,
    GIB,
    ComponentSize,
    MemoryPlan,
    format_bytes,
    plan_placement,
)
from kit.presets import Preset, load_preset, preset_names

logger = logging.getLogger(__name__)

HELP = "estimate the GPU memory a preset needs and pick a memory strategy"
TABLE_GPU_SIZES_GIB = (8, 12, 24, 80)


class SizeCounter:
    """Cache of model sizes by model id. Built-in models are built into ``scratch_dir``."""

    def __init__(self, scratch_dir: Path):
        self.scratch_dir = scratch_dir
        self._cache: dict[str, list[ComponentSize]] = {}

    def sizes(self, model_id: str) -> list[ComponentSize]:
        if model_id not in self._cache:
            self._cache[model_id] = self._count(model_id)
        return self._cache[model_id]

    def family(self, preset: Preset) -> ModelFamily:
        """Return the preset's model family, reading the pipeline class when it is "auto"."""
        if preset.generator.family != "auto":
            return FAMILIES[preset.generator.family]
        from kit.architectures import pipeline_class_name

        class_name = pipeline_class_name(str(self._folder_or_id(preset.generator.model)))
        return family_for_pipeline_class(class_name or "")

    def vae_tile_size(self, preset: Preset) -> int:
        from kit.architectures import vae_tile_size

        model_id = preset.generator.vae or preset.generator.model
        return vae_tile_size(str(self._folder_or_id(model_id))) or DEFAULT_VAE_TILE_SIZE

    def _folder_or_id(self, model_id: str) -> Path | str:
        from kit.architectures import BUILTIN_PREFIX

        if model_id.startswith(BUILTIN_PREFIX):
            from kit.loading import builtin_folder

            return builtin_folder(model_id.removeprefix(BUILTIN_PREFIX), self.scratch_dir)
        return model_id

    def _count(self, model_id: str) -> list[ComponentSize]:
        from kit.architectures import folder_component_sizes, meta_component_sizes

        # Sizes are counted at 2 bytes per parameter; plan_placement re-sizes them at its dtype.
        location = self._folder_or_id(model_id)
        if isinstance(location, Path):
            return folder_component_sizes(location, DTYPE_BYTES["float16"])
        return meta_component_sizes(location, DTYPE_BYTES["float16"])


def generator_sizes(preset: Preset, counter: SizeCounter) -> list[ComponentSize]:
    """Count the generator's pipeline components, with the preset's VAE in place of the stock one."""
    if not preset.features.generator:
        return []
    sizes = list(counter.sizes(preset.generator.model))
    if preset.generator.vae:
        vae_sizes = counter.sizes(preset.generator.vae)
        replacement = dataclasses.replace(vae_sizes[0], name="vae")
        sizes = [replacement if size.name == "vae" else size for size in sizes]
    return sizes


def captioner_sizes(preset: Preset, counter: SizeCounter) -> list[ComponentSize]:
    if not preset.features.describe:
        return []
    return list(counter.sizes(preset.describe.model))


def plan_for_preset(
    preset: Preset,
    counter: SizeCounter,
    *,
    device: str,
    free_bytes: int | None,
    width: int | None = None,
    height: int | None = None,
    num_images: int | None = None,
) -> MemoryPlan:
    """Plan a preset's models at its default size (or the given one) for ``free_bytes`` of GPU memory."""
    from kit.memory import pick_dtype

    defaults = preset.generator.defaults
    return plan_placement(
        generator_sizes(preset, counter),
        captioner_sizes(preset, counter),
        family=counter.family(preset),
        width=width or defaults.width,
        height=height or defaults.height,
        num_images=num_images or defaults.num_images,
        # diffusers runs classifier-free guidance only for guidance_scale > 1.
        guidance=defaults.guidance_scale > 1.0,
        device=device,
        free_bytes=free_bytes,
        dtype=pick_dtype(device, preset.generator.dtype),
        forced=preset.memory.strategy,
        headroom_fraction=preset.memory.headroom_fraction,
        vae_tiling_pixels=preset.memory.vae_tiling_pixels,
        vae_fp16_fix=preset.generator.vae is not None,
        vae_tile_size=counter.vae_tile_size(preset),
    )


def markdown_table(counter: SizeCounter, gpu_sizes_gib: tuple[int, ...] = TABLE_GPU_SIZES_GIB) -> str:
    """Plan every shipped preset for each GPU size and return the results as a markdown table."""
    rows = [
        "| preset | GPU memory (free) | strategy | weights | est. peak | VAE tiling | captioner placement |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in preset_names():
        preset = load_preset(name)
        for size_gib in gpu_sizes_gib:
            plan = plan_for_preset(preset, counter, device="cuda", free_bytes=size_gib * GIB)
            rows.append(
                f"| {name} | {size_gib} GiB | {plan.strategy.value} | {format_bytes(plan.weights_bytes)} | "
                f"{format_bytes(plan.peak_bytes)} | {'on' if plan.vae_tiling else 'off'} | {plan.captioner_placement} |"
            )
    return "\n".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="shipped preset name (for example sdxl) or path of a .toml file")
    parser.add_argument(
        "--all",
        action="store_true",
        help=f"print a markdown table of every shipped preset at {', '.join(map(str, TABLE_GPU_SIZES_GIB))} GiB",
    )
    parser.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GIB",
        help="free GPU memory to plan for, in GiB (default: the free memory of the CUDA device, if any)",
    )
    parser.add_argument("--width", type=int, help="image width in pixels (default: the preset's)")
    parser.add_argument("--height", type=int, help="image height in pixels (default: the preset's)")
    parser.add_argument("--num-images", type=int, help="images per job (default: the preset's)")
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        help="device to plan for (default: cuda when --gpu-memory is given or CUDA is available, else cpu)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.all and not args.preset:
        print("error: give --preset NAME or --all", file=sys.stderr)
        return 2
    for option in ("gpu_memory", "width", "height", "num_images"):
        value = getattr(args, option)
        if value is not None and value <= 0:
            print(f"error: --{option.replace('_', '-')} must be positive, got {value}", file=sys.stderr)
            return 2
    if args.device == "cpu" and args.gpu_memory is not None:
        print("error: --gpu-memory applies to --device cuda, not cpu", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="kit-plan-") as scratch:
        counter = SizeCounter(Path(scratch))
        try:
            if args.all:
                print(markdown_table(counter))
                return 0
            preset = load_preset(args.preset)
            device, free_bytes = _device_and_free_bytes(args, preset)
            plan = plan_for_preset(
                preset,
                counter,
                device=device,
                free_bytes=free_bytes,
                width=args.width,
                height=args.height,
                num_images=args.num_images,
            )
        except KitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(f"Preset {preset.name} ({preset.source})")
    print(plan.summary())
    return 0


def _device_and_free_bytes(args: argparse.Namespace, preset: Preset) -> tuple[str, int | None]:
    from kit.memory import cuda_free_bytes

    if args.gpu_memory is not None:
        return "cuda", int(args.gpu_memory * GIB)
    devices = preset.memory.devices
    if args.device:
        device = args.device
    elif isinstance(devices, tuple):
        # The plan is per replica, so the first device is taken as typical of the others.
        device = devices[0]
    else:
        device = "cpu" if devices == "cpu" else "cuda"
    if device == "cpu":
        return "cpu", None
    free_bytes = cuda_free_bytes(device)
    if free_bytes is None:
        logger.warning("CUDA is not available, so the plan is for the CPU; give --gpu-memory GIB to plan for a GPU")
        return "cpu", None
    return device, free_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kit plan", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))
