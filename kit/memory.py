"""Memory planning: where each model's weights live and how much device memory a job needs.

The planner estimates each pipeline component's bytes from its parameter count and dtype,
adds the working memory of the requested image size, and picks the cheapest placement that
fits in the free device memory with headroom. All figures are estimates built from layer
shapes (see ``working_memory_bytes``), not measurements: the headroom fraction and
``RUNTIME_RESERVE_BYTES`` absorb the difference.

This module imports torch only inside the two functions that read the device
(``cuda_free_bytes`` and ``pick_dtype``, and ``component_sizes`` for its type check), so
importing it never touches CUDA.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from kit.families import ModelFamily

logger = logging.getLogger(__name__)

GIB = 1024**3
MIB = 1024**2

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


class Strategy(str, enum.Enum):
    """Placement of the generator's pipeline components, cheapest (fastest) first."""

    # Every pipeline component stays on the GPU between jobs. No transfers per job.
    GPU = "gpu"
    # Weights live in CPU memory. Each pipeline component (text encoders, UNet, VAE) moves to
    # the GPU as a whole while it runs, so the GPU contains one component at a time
    # (diffusers `enable_model_cpu_offload`).
    MODEL_OFFLOAD = "model_offload"
    # Weights live in CPU memory. Each layer moves to the GPU only for its own forward pass,
    # so the GPU contains about one layer plus activations. Several times slower than
    # model offload (diffusers `enable_sequential_cpu_offload`).
    SEQUENTIAL_OFFLOAD = "sequential_offload"
    # Weights and activations stay in CPU memory, in float32. No GPU is used.
    CPU = "cpu"

    @property
    def description(self) -> str:
        return _STRATEGY_DESCRIPTIONS[self]


_STRATEGY_DESCRIPTIONS = {
    Strategy.GPU: "all on GPU",
    Strategy.MODEL_OFFLOAD: "model CPU offload",
    Strategy.SEQUENTIAL_OFFLOAD: "sequential CPU offload",
    Strategy.CPU: "CPU only",
}

STRATEGY_NAMES = tuple(strategy.value for strategy in Strategy)

# The order in which an out-of-memory retry steps down. CPU is not a step: a GPU site that
# falls back to the CPU would answer every later visitor minutes late.
_LOWER = {Strategy.GPU: Strategy.MODEL_OFFLOAD, Strategy.MODEL_OFFLOAD: Strategy.SEQUENTIAL_OFFLOAD}


def lower_strategy(strategy: Strategy) -> Strategy | None:
    """Return the next strategy that uses less device memory, or None at the bottom."""
    return _LOWER.get(strategy)

# Pipeline component names by the phase of a job in which they run. Text encoders and other
# components run before denoising. Their working memory is small next to their weights
# (77 tokens per prompt), so the planner counts it as zero.
DENOISER_NAMES = ("unet", "transformer", "prior")
VAE_PREFIX = "vae"

# Device memory that the estimates below do not model: cuBLAS workspaces, cuDNN convolution
# workspaces (which grow with the image size) and fragmentation in PyTorch's caching
# allocator. An estimate, not a measurement.
RUNTIME_RESERVE_BYTES = 512 * MIB

# Working memory of the captioner for one image: BLIP-large at 384x384 keeps 577 tokens x
# 1024 channels per vision layer (under 100 MiB), and beam search adds a small key/value
# cache. The figure is a rounded-up estimate for BLIP-sized captioners.
CAPTIONER_WORKING_BYTES = 512 * MIB

# Side of the square tile that diffusers' AutoencoderKL decodes when tiling is on. diffusers
# takes it from the VAE config's `sample_size`. This default, for VAEs whose config is not
# at hand, is the value of the SDXL fp16-fix VAE.
DEFAULT_VAE_TILE_SIZE = 512

# Denoiser activations per latent cell and per sample, in feature-map channels (multiply by
# the dtype's bytes). For the UNet families the base width is 320 channels at latent
# resolution: the encoder half keeps about 5 such maps for the skip connections, and the
# widest step (the first decoder resnet: concatenated input, its normalised copy and the
# output, or a GEGLU feed-forward at 8x width) adds about 12 more. 24 maps leaves slack.
# Attention is assumed to run through PyTorch's scaled_dot_product_attention with a fused
# kernel, which never stores the full token-by-token score matrix.
_DENOISER_CHANNELS = {
    "sd": 320 * 24,
    "sd2": 320 * 24,
    "sdxl": 320 * 24,
    # NOTE: the transformer families are rough figures (hidden width over the 2x2 patch
    # cells, times 16 maps) that no measurement has checked.
    "sd3": 1536 // 4 * 16,
    "flux": 3072 // 4 * 16,
}

# The VAE decoder peaks in its last up block, at full image resolution: the upsampled
# 256-channel input, its normalised and activated copies and the 128-channel convolution
# output are alive at once, about 7 maps of 128 channels. 8 leaves slack. The same VAE
# widths (128..512) serve every family above, and the encoder that img2img runs is
# narrower, so this also bounds the encode step.
_VAE_DECODER_WIDTH = 128
_VAE_DECODER_MAPS = 8


@dataclass(frozen=True)
class ComponentSize:
    """Size of one model: a pipeline component or a captioner."""

    name: str
    parameters: int
    bytes: int  # parameters and buffers, at the dtype the sizes were counted for
    buffer_bytes: int = 0
    # Parameters of the largest single module (its own parameters, not its children's):
    # what sequential offload moves to the GPU at once.
    largest_layer_parameters: int = 0

    def at_dtype(self, dtype_bytes: int) -> ComponentSize:
        """Return this size with the parameters stored at ``dtype_bytes`` bytes each."""
        return replace(self, bytes=self.parameters * dtype_bytes + self.buffer_bytes)

    def largest_layer_bytes(self, dtype_bytes: int) -> int:
        # Without a per-layer count, the whole component is the only safe bound.
        parameters = self.largest_layer_parameters or self.parameters
        return parameters * dtype_bytes


def format_bytes(count: int | float) -> str:
    """Format a byte count as GiB with one decimal, or as whole MiB below 1 GiB."""
    if count >= GIB:
        return f"{count / GIB:.1f} GiB"
    return f"{count / MIB:.0f} MiB"


def format_gib(count: int | float) -> str:
    return f"{count / GIB:.1f} GiB"


def component_sizes(pipe_or_modules: Any, dtype_bytes: int | None) -> list[ComponentSize]:
    """Count the parameters and buffers of each torch module of a pipeline or mapping.

    ``pipe_or_modules`` is a diffusers pipeline (its ``components`` dict is read) or a
    mapping from name to module. Entries that are not ``torch.nn.Module`` (tokenizers,
    schedulers, None) are skipped. With ``dtype_bytes`` set, parameters and floating-point
    buffers are sized at that many bytes each; with None, at their current dtype. Only
    shapes are read, so modules on the meta device work.
    """
    import torch

    modules: Mapping[str, Any]
    if isinstance(pipe_or_modules, Mapping):
        modules = pipe_or_modules
    elif hasattr(pipe_or_modules, "components"):
        modules = pipe_or_modules.components
    else:
        raise TypeError(
            f"expected a diffusers pipeline or a dict of name -> module, got {type(pipe_or_modules).__name__}"
        )

    sizes = []
    for name, module in modules.items():
        if not isinstance(module, torch.nn.Module):
            continue
        parameter_count = 0
        parameter_bytes = 0
        for parameter in module.parameters():
            parameter_count += parameter.numel()
            parameter_bytes += parameter.numel() * (dtype_bytes or parameter.element_size())
        buffer_bytes = 0
        for buffer in module.buffers():
            element_bytes = buffer.element_size()
            if dtype_bytes is not None and buffer.is_floating_point():
                element_bytes = dtype_bytes
            buffer_bytes += buffer.numel() * element_bytes
        largest_layer = max(
            (sum(p.numel() for p in sub.parameters(recurse=False)) for sub in module.modules()),
            default=0,
        )
        sizes.append(
            ComponentSize(
                name=name,
                parameters=parameter_count,
                bytes=parameter_bytes + buffer_bytes,
                buffer_bytes=buffer_bytes,
                largest_layer_parameters=largest_layer,
            )
        )
    return sizes


def working_memory_bytes(
    family: ModelFamily,
    width: int,
    height: int,
    num_images: int,
    dtype_bytes: int,
    guidance: bool,
    *,
    vae_dtype_bytes: int | None = None,
    vae_tiling: bool = False,
    vae_slicing: bool = False,
    vae_tile_size: int = DEFAULT_VAE_TILE_SIZE,
) -> dict[str, int]:
    """Estimate the device memory a job needs beyond the weights, per phase.

    Returns ``{"denoise": ..., "vae_decode": ...}`` in bytes. Both are estimates from layer
    widths, not measurements:

    - denoise: the latents plus the denoiser's activations at latent resolution (see
      ``_DENOISER_CHANNELS``). Classifier-free guidance doubles the batch.
    - vae_decode: the decoder's activations at output resolution (about 8 maps of 128
      channels per pixel), or its mid-block attention at latent resolution if that is
      larger. The attention term assumes the worst case, a score matrix that is stored
      whole. With tiling, one ``vae_tile_size`` square tile is decoded at a time. With
      slicing, one image at a time.
    """
    if width < 1 or height < 1 or num_images < 1:
        raise ValueError(f"width, height and num_images must be positive, got {width}, {height}, {num_images}")
    vae_dtype_bytes = vae_dtype_bytes or dtype_bytes
    scale = family.vae_scale_factor

    batch = num_images * (2 if guidance else 1)
    latent_cells = (width // scale) * (height // scale)
    channels = _DENOISER_CHANNELS.get(family.name, _DENOISER_CHANNELS["sdxl"])
    latents = batch * family.latent_channels * latent_cells * dtype_bytes
    denoise = latents + batch * latent_cells * channels * dtype_bytes

    decoded_images = 1 if vae_slicing else num_images
    if vae_tiling:
        tile = min(vae_tile_size, width) * min(vae_tile_size, height)
        decode_pixels = tile
        # The decoded tiles of the whole image are kept until they are blended.
        output = decoded_images * 3 * width * height * vae_dtype_bytes * 2
    else:
        decode_pixels = width * height
        output = 0
    decode_cells = decode_pixels // (scale * scale)
    full_resolution = decode_pixels * _VAE_DECODER_WIDTH * _VAE_DECODER_MAPS * vae_dtype_bytes
    mid_attention = decode_cells * decode_cells * vae_dtype_bytes
    vae_decode = decoded_images * max(full_resolution, mid_attention) + output

    return {"denoise": denoise, "vae_decode": vae_decode}


@dataclass(frozen=True)
class MemoryPlan:
    """Placement chosen for a generator and its captioner, with the figures behind it."""

    strategy: Strategy
    device: str
    dtype: str
    components: tuple[ComponentSize, ...]
    captioner_components: tuple[ComponentSize, ...]
    weights_bytes: int  # generator and captioner weights, wherever they live
    working_bytes: int  # the larger of the denoise and VAE decode working memory
    peak_bytes: int  # estimated peak on the device (in CPU memory for Strategy.CPU)
    free_bytes: int | None  # free device memory the plan assumed; None on CPU
    vae_tiling: bool
    vae_slicing: bool
    captioner_on_gpu: bool  # the captioner stays on the GPU beside the generator
    reasons: tuple[str, ...]
    # "gpu" (stays on the GPU), "offload" (in CPU memory, moved to the GPU for each describe
    # job while the model not in use is offloaded), "cpu", or "none" (no captioner).
    captioner_placement: str = "none"
    vae_dtype: str = "float32"
    width: int = 0
    height: int = 0
    num_images: int = 1
    denoise_bytes: int = 0
    vae_decode_bytes: int = 0
    budget_bytes: int | None = None  # free_bytes less the headroom

    def summary(self) -> str:
        """Describe the plan in a few lines: sizes, strategy, estimated peak and why."""
        name_width = max((len(size.name) for size in self.components + self.captioner_components), default=0)
        lines = [f"Pipeline components ({self.dtype}):"]
        lines += [_component_line(size, name_width) for size in self.components]
        if self.captioner_components:
            lines.append("Captioner:")
            lines += [_component_line(size, name_width) for size in self.captioner_components]
        lines.append(f"Weights: {format_bytes(self.weights_bytes)}")
        images = "image" if self.num_images == 1 else "images"
        lines.append(
            f"Working memory at {self.width}x{self.height}, {self.num_images} {images}: "
            f"denoise {format_bytes(self.denoise_bytes)}, VAE decode {format_bytes(self.vae_decode_bytes)}"
        )
        lines.append(f"Strategy: {self.strategy.value} ({self.strategy.description}) on {self.device}")
        lines.append(
            f"VAE tiling: {_on_off(self.vae_tiling)}, VAE slicing: {_on_off(self.vae_slicing)}, "
            f"VAE dtype: {self.vae_dtype}"
        )
        lines.append(f"Captioner placement: {self.captioner_placement}")
        if self.free_bytes is None:
            lines.append(f"Estimated peak: {format_gib(self.peak_bytes)} of CPU memory")
        else:
            lines.append(
                f"Estimated peak: {format_gib(self.peak_bytes)} on the GPU, "
                f"{format_gib(self.free_bytes)} free"
            )
        lines.append("Why:")
        lines += [f"  - {reason}" for reason in self.reasons]
        return "\n".join(lines)

    def with_strategy(self, strategy: Strategy, reason: str) -> MemoryPlan:
        """Return a copy of this plan placed with ``strategy``, VAE tiling on, and ``reason`` added."""
        return replace(self, strategy=strategy, vae_tiling=True, reasons=(*self.reasons, reason))

    def one_line(self) -> str:
        """Summarize the plan in one line, for a page footer."""
        text = f"{self.strategy.description}, {self.dtype}, est. peak {format_gib(self.peak_bytes)}"
        if self.free_bytes is not None:
            text += f" of {format_gib(self.free_bytes)} free"
        if self.vae_tiling:
            text += ", VAE tiling"
        return text


def _component_line(size: ComponentSize, name_width: int) -> str:
    return f"  {size.name:<{name_width}}  {size.parameters / 1e6:>8.1f} M parameters  {format_bytes(size.bytes):>9}"


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


def _phase_of(component_name: str) -> str:
    if component_name in DENOISER_NAMES:
        return "denoise"
    if component_name.startswith(VAE_PREFIX):
        return "vae_decode"
    return "prompt"


_RESERVE_NOTE = f" + {format_gib(RUNTIME_RESERVE_BYTES)} runtime reserve"


@dataclass(frozen=True)
class _Fit:
    """Estimated device peak of one strategy with VAE tiling on or off."""

    strategy: Strategy
    vae_tiling: bool
    peak_bytes: int
    working: dict[str, int]
    detail: str  # names what sets the peak, for the reasons


def _estimate_fit(
    strategy: Strategy,
    vae_tiling: bool,
    generator: list[ComponentSize],
    dtype_bytes: int,
    vae_dtype_bytes: int,
    work_args: dict[str, Any],
) -> _Fit:
    working = working_memory_bytes(
        **work_args, dtype_bytes=dtype_bytes, vae_dtype_bytes=vae_dtype_bytes, vae_tiling=vae_tiling
    )
    largest_working = max(working.values())

    if strategy is Strategy.GPU:
        weights = sum(size.bytes for size in generator)
        peak = weights + largest_working + RUNTIME_RESERVE_BYTES
        detail = f"{format_gib(weights)} weights + {format_gib(largest_working)} working memory"
    elif strategy is Strategy.MODEL_OFFLOAD:
        # One pipeline component is on the GPU at a time, with the working memory of its phase.
        peak, detail = RUNTIME_RESERVE_BYTES, "no component"
        for size in generator:
            phase_working = working.get(_phase_of(size.name), 0)
            candidate = size.bytes + phase_working + RUNTIME_RESERVE_BYTES
            if candidate > peak:
                peak = candidate
                detail = f"{size.name} {format_gib(size.bytes)} + {format_gib(phase_working)} working memory"
    else:
        largest_layer = max(
            (
                size.largest_layer_bytes(vae_dtype_bytes if _phase_of(size.name) == "vae_decode" else dtype_bytes)
                for size in generator
            ),
            default=0,
        )
        peak = largest_layer + largest_working + RUNTIME_RESERVE_BYTES
        detail = f"largest layer {format_bytes(largest_layer)} + {format_gib(largest_working)} working memory"

    return _Fit(strategy, vae_tiling, peak, working, detail + _RESERVE_NOTE)


def _fit_sentence(fit: _Fit, budget: int, free: int, headroom_fraction: float) -> str:
    tiling = " with VAE tiling" if fit.vae_tiling else ""
    verdict = "fits" if fit.peak_bytes <= budget else "does not fit"
    return (
        f"{fit.strategy.description}{tiling} needs {format_gib(fit.peak_bytes)} ({fit.detail}); "
        f"{format_gib(free)} free with {headroom_fraction:.0%} headroom leaves {format_gib(budget)}, so it {verdict}"
    )


def plan_placement(
    generator: list[ComponentSize],
    captioner: list[ComponentSize],
    *,
    family: ModelFamily,
    width: int,
    height: int,
    num_images: int,
    guidance: bool,
    device: str,
    free_bytes: int | None,
    dtype: str,
    forced: str = "auto",
    headroom_fraction: float = 0.1,
    vae_tiling_pixels: int,
    vae_fp16_fix: bool = False,
    vae_tile_size: int = DEFAULT_VAE_TILE_SIZE,
) -> MemoryPlan:
    """Pick the cheapest placement of the generator and captioner that fits in ``free_bytes``.

    Every component is re-sized at the plan's dtype: ``dtype`` on the GPU, float32 on the
    CPU, and float32 for a VAE that overflows in float16 (``family.vae_fp16_unsafe``) unless
    ``vae_fp16_fix`` is true, meaning that a fine-tuned fp16-safe VAE replaces it. Strategies are tried
    cheapest first (``Strategy`` order), each without and then with VAE tiling. If none
    fits, the plan is sequential offload with tiling and a reason saying that it may run
    out of memory. ``forced`` (a ``Strategy`` value) skips the search.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}; resolve 'auto' with pick_dtype()")
    if forced != "auto" and forced not in STRATEGY_NAMES:
        raise ValueError(f"forced strategy {forced!r} is not one of auto, {', '.join(STRATEGY_NAMES)}")
    if not 0.0 <= headroom_fraction < 1.0:
        raise ValueError(f"headroom_fraction must be in [0, 1), got {headroom_fraction}")

    reasons: list[str] = []
    on_cpu = device == "cpu" or free_bytes is None or forced == Strategy.CPU.value
    if forced != "auto":
        reasons.append(f"the preset forces {forced} (memory.strategy)")
    elif device == "cpu":
        reasons.append("the device is the CPU")
    elif free_bytes is None:
        reasons.append(f"the free memory of {device} is unknown (no CUDA), so everything runs on the CPU")

    plan_dtype = "float32" if on_cpu else dtype
    vae_dtype = plan_dtype
    if plan_dtype == "float16" and family.vae_fp16_unsafe and not vae_fp16_fix:
        vae_dtype = "float32"
        reasons.append(f"the VAE runs in float32 because the stock {family.name} VAE overflows in float16")
    dtype_bytes = DTYPE_BYTES[plan_dtype]
    vae_dtype_bytes = DTYPE_BYTES[vae_dtype]
    sized_generator = [
        size.at_dtype(vae_dtype_bytes if _phase_of(size.name) == "vae_decode" else dtype_bytes) for size in generator
    ]
    sized_captioner = [size.at_dtype(dtype_bytes) for size in captioner]

    vae_slicing = num_images > 1
    if vae_slicing:
        reasons.append(f"VAE slicing is on because a job makes {num_images} images")
    pixels = width * height
    tiling_by_size = pixels > vae_tiling_pixels
    if tiling_by_size:
        reasons.append(
            f"VAE tiling is on because {width}x{height} ({pixels} pixels) is above "
            f"memory.vae_tiling_pixels ({vae_tiling_pixels})"
        )
    work_args = {
        "family": family,
        "width": width,
        "height": height,
        "num_images": num_images,
        "guidance": guidance,
        "vae_slicing": vae_slicing,
        "vae_tile_size": vae_tile_size,
    }
    common = {
        "device": "cpu" if on_cpu else device,
        "dtype": plan_dtype,
        "vae_dtype": vae_dtype,
        "components": tuple(sized_generator),
        "vae_slicing": vae_slicing,
        "width": width,
        "height": height,
        "num_images": num_images,
    }

    if on_cpu:
        plan = _cpu_plan(sized_generator, sized_captioner, tiling_by_size, work_args, reasons, common)
        logger.debug("memory plan: %s", plan.one_line())
        return plan

    assert free_bytes is not None
    budget = int(free_bytes * (1.0 - headroom_fraction))
    candidates = [Strategy(forced)] if forced != "auto" else [s for s in Strategy if s is not Strategy.CPU]
    tiling_options = [True] if tiling_by_size else [False, True]


    def estimate(strategy: Strategy, vae_tiling: bool) -> _Fit:
        return _estimate_fit(strategy, vae_tiling, sized_generator, dtype_bytes, vae_dtype_bytes, work_args)

    chosen = _choose_fit(estimate, candidates, tiling_options, budget, free_bytes, headroom_fraction, reasons)
    if chosen.vae_tiling and not tiling_by_size and chosen.peak_bytes <= budget:
        reasons.append("VAE tiling is on because the full-size VAE decode would not fit")

    placement, peak = _place_captioner(chosen, sized_generator, sized_captioner, budget, reasons)
    if placement == "cpu":
        sized_captioner = [size.at_dtype(DTYPE_BYTES["float32"]) for size in captioner]

    plan = MemoryPlan(
        strategy=chosen.strategy,
        captioner_components=tuple(sized_captioner),
        weights_bytes=sum(s.bytes for s in sized_generator) + sum(s.bytes for s in sized_captioner),
        working_bytes=max(chosen.working.values()),
        peak_bytes=peak,
        free_bytes=free_bytes,
        budget_bytes=budget,
        vae_tiling=chosen.vae_tiling,
        captioner_on_gpu=placement == "gpu",
        captioner_placement=placement,
        reasons=tuple(reasons),
        denoise_bytes=chosen.working["denoise"],
        vae_decode_bytes=chosen.working["vae_decode"],
        **common,
    )
    logger.debug("memory plan: %s", plan.one_line())
    return plan


def _choose_fit(
    estimate: Callable[[Strategy, bool], _Fit],
    candidates: list[Strategy],
    tiling_options: list[bool],
    budget: int,
    free_bytes: int,
    headroom_fraction: float,
    reasons: list[str],
) -> _Fit:
    """Return the first candidate that fits in ``budget``, or the last one with tiling if none fits."""
    for strategy in candidates:
        for vae_tiling in tiling_options:
            fit = estimate(strategy, vae_tiling)
            reasons.append(_fit_sentence(fit, budget, free_bytes, headroom_fraction))
            if fit.peak_bytes <= budget:
                return fit

    fallback = estimate(candidates[-1], True)
    reasons.append(
        f"nothing fits: using {fallback.strategy.description} with VAE tiling, which needs "
        f"{format_gib(fallback.peak_bytes)} and may run out of memory"
    )
    return fallback


def _place_captioner(
    fit: _Fit,
    generator: list[ComponentSize],
    captioner: list[ComponentSize],
    budget: int,
    reasons: list[str],
) -> tuple[str, int]:
    """Decide where the captioner lives beside the chosen generator plan; return it and the peak."""
    if not captioner:
        return "none", fit.peak_bytes

    captioner_bytes = sum(size.bytes for size in captioner)
    # Generator weights that stay on the GPU while a describe job runs.
    resident = sum(size.bytes for size in generator) if fit.strategy is Strategy.GPU else 0
    describe_alone = captioner_bytes + CAPTIONER_WORKING_BYTES + RUNTIME_RESERVE_BYTES
    both_peak = max(fit.peak_bytes + captioner_bytes, resident + describe_alone)
    if both_peak <= budget:
        reasons.append(
            f"the captioner ({format_bytes(captioner_bytes)}) fits beside the generator, so it stays on the GPU"
        )
        return "gpu", both_peak
    if describe_alone <= budget:
        reasons.append(
            f"the captioner ({format_bytes(captioner_bytes)}) does not fit beside the generator "
            f"({format_gib(both_peak)} needed), so the model not in use is offloaded to the CPU"
        )
        return "offload", max(fit.peak_bytes, describe_alone)
    reasons.append(
        f"the captioner needs {format_gib(describe_alone)} even alone, more than the budget, so it runs on the CPU"
    )
    return "cpu", fit.peak_bytes


def _cpu_plan(
    generator: list[ComponentSize],
    captioner: list[ComponentSize],
    vae_tiling: bool,
    work_args: dict[str, Any],
    reasons: list[str],
    common: dict[str, Any],
) -> MemoryPlan:
    working = working_memory_bytes(**work_args, dtype_bytes=DTYPE_BYTES["float32"], vae_tiling=vae_tiling)
    weights = sum(s.bytes for s in generator) + sum(s.bytes for s in captioner)
    peak = weights + max(working.values()) + (CAPTIONER_WORKING_BYTES if captioner else 0)
    reasons.append(f"CPU memory needed: about {format_gib(peak)} (weights {format_gib(weights)}, float32)")
    return MemoryPlan(
        strategy=Strategy.CPU,
        captioner_components=tuple(captioner),
        weights_bytes=weights,
        working_bytes=max(working.values()),
        peak_bytes=peak,
        free_bytes=None,
        vae_tiling=vae_tiling,
        captioner_on_gpu=False,
        captioner_placement="cpu" if captioner else "none",
        reasons=tuple(reasons),
        denoise_bytes=working["denoise"],
        vae_decode_bytes=working["vae_decode"],
        **common,
    )


def cuda_free_bytes(device: str) -> int | None:
    """Return the free memory of a CUDA device in bytes, or None without CUDA.

    Calling this creates the CUDA context of the process, so call it when a model is first
    needed, never at import.
    """
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.device(device).index
    if index is None:
        index = torch.cuda.current_device()
    free, _total = torch.cuda.mem_get_info(index)
    return int(free)


def pick_dtype(device: str, requested: str) -> str:
    """Resolve a preset's dtype for a device.

    "auto" is bfloat16 on CUDA devices that support it, float16 on other CUDA devices, and
    float32 on the CPU. Half precision requested for the CPU becomes float32, with a warning.
    When planning for a CUDA device on a machine without CUDA, "auto" is float16.
    """
    if requested != "auto" and requested not in DTYPE_BYTES:
        raise ValueError(f"dtype {requested!r} is not one of auto, {', '.join(DTYPE_BYTES)}")
    if device == "cpu":
        if requested in ("float16", "bfloat16"):
            logger.warning(
                "dtype %s requested on the CPU; using float32 because many CPU kernels are slow or missing in half precision",
                requested,
            )
        return "float32"
    if requested != "auto":
        return requested

    import torch

    if not torch.cuda.is_available():
        logger.debug("CUDA is not available; planning %s in float16", device)
        return "float16"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
