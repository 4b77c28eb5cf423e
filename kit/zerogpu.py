"""Hugging Face ZeroGPU: run GPU work inside ``spaces.GPU`` with a duration sized to the job.

On a ZeroGPU Space the process has no GPU until a function decorated with
``spaces.GPU(duration=...)`` runs, and the Space gets one for at most ``duration`` seconds.
A short duration puts the visitor ahead in ZeroGPU's queue, and a job that outlives its
duration is stopped, so the kit sizes it from the job's steps, size and image count.

ZeroGPU is active when the ``spaces`` package is importable and ``SPACES_ZERO_GPU`` is set
to a true value, which is what ZeroGPU Spaces set. Everywhere else ``gpu_call`` returns the
function unchanged and nothing here imports ``spaces``.

NOTE: ``spaces`` (read at version 0.47) runs the decorated function in a forked worker
process. Thread-side effects of the function, such as per-step progress updates and a
cancel flag set while it runs, do not cross into that process. Each call decorates a new
function, which ``spaces`` keeps in its cache together with its idle worker process. This
seam has not been run on a ZeroGPU Space.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

ZERO_GPU_VARIABLE = "SPACES_ZERO_GPU"
MAX_DURATION_VARIABLE = "KIT_ZEROGPU_MAX_DURATION"
# The longest GPU call that ZeroGPU grants by default, in seconds. Accounts with a larger
# allowance raise it with KIT_ZEROGPU_MAX_DURATION.
DEFAULT_MAX_DURATION_SECONDS = 120

# Seconds per denoising step for one 1024x1024 (1 MP) image with classifier-free guidance on
# a ZeroGPU slice. NOTE: rough estimates with a safety margin, not measured on ZeroGPU
# hardware; bench/gpu_check.py measures seconds per image on a CUDA machine.
SECONDS_PER_STEP_PER_MEGAPIXEL = {
    "sd": 0.2,
    "sd2": 0.2,
    "sdxl": 0.3,
    "sd3": 0.4,
    "flux": 1.0,
}
# Seconds added to every call: moving the weights onto the GPU in the worker process, the
# text encoders and the VAE decode. An estimate.
LOAD_MARGIN_SECONDS = 15
# Duration requested for one describe job (a captioner call with beam search). An estimate.
DESCRIBE_DURATION_SECONDS = 20

_TRUE_VALUES = {"1", "t", "true", "yes", "on"}

Result = TypeVar("Result")


def is_active(environ: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """Return True on a ZeroGPU Space: ``SPACES_ZERO_GPU`` is true and ``spaces`` can be imported."""
    environ = os.environ if environ is None else environ
    if environ.get(ZERO_GPU_VARIABLE, "").strip().lower() not in _TRUE_VALUES:
        return False
    return importlib.util.find_spec("spaces") is not None


def import_spaces() -> Any:
    """Import ``spaces``, which patches torch. ZeroGPU requires the import before CUDA is first used."""
    import spaces

    return spaces


def max_duration(environ: dict[str, str] | os._Environ[str] | None = None) -> int:
    """Return the duration cap in seconds: ``KIT_ZEROGPU_MAX_DURATION`` or 120."""
    environ = os.environ if environ is None else environ
    raw = environ.get(MAX_DURATION_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_MAX_DURATION_SECONDS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        logger.warning(
            "%s=%r is not a whole number of seconds above 0, so the cap stays at %d s",
            MAX_DURATION_VARIABLE,
            raw,
            DEFAULT_MAX_DURATION_SECONDS,
        )
        return DEFAULT_MAX_DURATION_SECONDS
    return value


def estimate_duration(family: str, steps: int, width: int, height: int, num_images: int) -> int:
    """Estimate the seconds of GPU time a generation job needs, capped by ``max_duration()``.

    The estimate is seconds per step for the family (the SDXL figure for unknown families)
    x steps x megapixels x images, plus ``LOAD_MARGIN_SECONDS``, rounded up.
    """
    if steps < 1 or width < 1 or height < 1 or num_images < 1:
        raise ValueError(
            f"steps, width, height and num_images must be positive, got {steps}, {width}, {height}, {num_images}"
        )
    per_step = SECONDS_PER_STEP_PER_MEGAPIXEL.get(family, SECONDS_PER_STEP_PER_MEGAPIXEL["sdxl"])
    megapixels = width * height / 1_000_000
    seconds = per_step * steps * megapixels * num_images + LOAD_MARGIN_SECONDS
    return min(math.ceil(seconds), max_duration())


def gpu_call(fn: Callable[..., Result], duration_s: int) -> Callable[..., Result]:
    """Return ``fn`` decorated with ``spaces.GPU(duration=duration_s)`` on ZeroGPU, else ``fn`` itself."""
    if not is_active():
        return fn
    spaces = import_spaces()
    return spaces.GPU(duration=duration_s)(fn)
