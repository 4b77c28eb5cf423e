"""What the kit needs to know about each diffusion model family.

A family fixes the size multiple that the pipeline accepts, the VAE's downscale factor, the
latent channels and a sensible default size. The kit snaps or rejects sizes with these
figures before a job is queued.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    name: str
    size_multiple: int  # width and height must be multiples of this, in pixels
    vae_scale_factor: int  # pixels per latent cell along one side
    latent_channels: int
    native_size: int  # the training resolution, in pixels along one side
    text_window: int  # tokens the (first) text encoder reads; longer prompts are cut
    vae_fp16_unsafe: bool = False  # the stock VAE overflows in float16 (SDXL family)


FAMILIES: dict[str, ModelFamily] = {
    "sd": ModelFamily("sd", 8, 8, 4, 512, 77),
    "sd2": ModelFamily("sd2", 8, 8, 4, 768, 77),
    "sdxl": ModelFamily("sdxl", 8, 8, 4, 1024, 77, vae_fp16_unsafe=True),
    "sd3": ModelFamily("sd3", 16, 8, 16, 1024, 77),
    "flux": ModelFamily("flux", 16, 8, 16, 1024, 77),
}

# diffusers pipeline class name prefix -> family
_PIPELINE_PREFIXES = (
    ("StableDiffusionXL", "sdxl"),
    ("StableDiffusion3", "sd3"),
    ("Flux", "flux"),
    ("StableDiffusion", "sd"),
)


def family_for_pipeline_class(class_name: str) -> ModelFamily:
    """Return the family of a diffusers pipeline class, defaulting to Stable Diffusion."""
    for prefix, family in _PIPELINE_PREFIXES:
        if class_name.startswith(prefix):
            return FAMILIES[family]
    return FAMILIES["sd"]


def snap_to_multiple(value: int, multiple: int) -> int:
    """Return the multiple of ``multiple`` nearest to ``value`` (ties round down), at least one multiple."""
    lower = (value // multiple) * multiple
    upper = lower + multiple
    nearest = lower if value - lower <= upper - value else upper
    return max(multiple, nearest)
