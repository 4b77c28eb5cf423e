"""Warm-up at start: load the models on every replica and run one tiny job, so the first visitor does not wait for loading."""

from __future__ import annotations

import logging
import threading
import time

from kit.generate import GenerationRequest

logger = logging.getLogger(__name__)


def warm_up(services) -> float:
    """Load the models on every replica, run one small job and return the seconds it took.

    Nothing the warm-up makes is saved to the gallery. The small generation job and describe
    call run the first forward passes, which on a GPU also pay for kernel selection.
    """
    preset = services.preset
    features = preset.features
    started = time.perf_counter()
    services.models.preload(generator=features.generator, captioner=features.describe)

    image = None
    if features.generator:
        lim, d = preset.generator.limits, preset.generator.defaults
        size = max(lim.min_size, services.models.family.size_multiple * 8)
        size = min(size, lim.max_size)
        request = GenerationRequest(
            prompt="warm-up",
            seed=0,
            steps=lim.min_steps,
            guidance_scale=d.guidance_scale,
            width=size,
            height=size,
            num_images=1,
        )
        job = services.generator.start(request, owner="warm-up", save=False)
        image = job.wait().images[0]
    if features.describe:
        from PIL import Image

        services.describer.describe(image if image is not None else Image.new("RGB", (64, 64), "gray"))

    seconds = time.perf_counter() - started
    logger.info("warm-up finished in %.2f s on %d replica(s)", seconds, services.models.replica_count)
    return seconds


def warm_up_in_background(services) -> threading.Thread:
    """Run ``warm_up`` in a daemon thread. A failure is logged, and the first job then loads the models."""

    def run() -> None:
        try:
            warm_up(services)
        except Exception:
            logger.exception("warm-up failed; the first job will load the models instead")

    thread = threading.Thread(target=run, name="kit-warm-up", daemon=True)
    thread.start()
    return thread
