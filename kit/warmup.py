"""Warm-up: one tiny generation at start, so the first visitor does not pay for loading."""

from __future__ import annotations

import logging
import threading
import time

from kit.generate import GenerationRequest

logger = logging.getLogger(__name__)


def warm_up(services) -> float:
    """Load the models and run one small, short job; return the seconds it took."""
    preset = services.preset
    lim, d = preset.generator.limits, preset.generator.defaults
    size = max(lim.min_size, services.models.family.size_multiple * 8)
    size = min(size, lim.max_size)
    request = GenerationRequest(
        prompt="warm-up", seed=0, steps=lim.min_steps, guidance_scale=d.guidance_scale, width=size, height=size, num_images=1
    )
    started = time.perf_counter()
    job = services.generator.start(request, owner="warm-up", save=False)
    job.wait()
    if preset.features.describe:
        services.describer.describe(job.result.images[0])
    seconds = time.perf_counter() - started
    logger.info("warm-up finished in %.2f s", seconds)
    return seconds


def warm_up_in_background(services) -> threading.Thread:
    def run() -> None:
        try:
            warm_up(services)
        except Exception:
            logger.exception("warm-up failed; the first job will load the models instead")

    thread = threading.Thread(target=run, name="kit-warm-up", daemon=True)
    thread.start()
    return thread
