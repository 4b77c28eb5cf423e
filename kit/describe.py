"""Describe an image with a transformers captioning model (BLIP family)."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from kit import zerogpu
from kit.errors import InvalidRequest
from kit.images import open_image
from kit.models import ModelManager
from kit.presets import Preset

logger = logging.getLogger(__name__)

# Captioners repeat themselves or stop mid-phrase when they hit max_new_tokens; these words
# cannot end a complete phrase, so a caption that ends on one is cut back to the last good word.
_DANGLING = {"a", "an", "the", "of", "on", "in", "with", "and", "or", "to", "at", "by", "for", "from", "its", "their"}


def tidy_caption(text: str) -> str:
    """Remove repeated words and dangling words at the end of a generated caption."""
    words = re.sub(r"\s+", " ", text).strip().split(" ")
    deduplicated: list[str] = []
    for word in words:
        if not deduplicated or word.lower() != deduplicated[-1].lower():
            deduplicated.append(word)
    while deduplicated and deduplicated[-1].lower().strip(",.;:") in _DANGLING:
        deduplicated.pop()
    caption = " ".join(deduplicated).strip(" ,;:")
    return caption


class DescribeService:
    def __init__(self, preset: Preset, models: ModelManager):
        self.preset = preset
        self.models = models

    def check(self, image: Any) -> Any:
        if not image:
            raise InvalidRequest("image", "upload an image to describe.")
        path = image["path"] if isinstance(image, dict) else image
        if not isinstance(path, str | Path):
            raise InvalidRequest("image", "image must be an uploaded image file.")
        return open_image(path, "image", self.preset.security.max_input_pixels)

    def describe(self, image: Any) -> str:
        """Return a caption for an image path (or an already opened PIL image)."""
        import torch

        picture = image if hasattr(image, "size") and hasattr(image, "mode") else self.check(image)
        settings = self.preset.describe
        started = time.perf_counter()
        with self.models.acquire(need_generator=False, need_captioner=True) as replica:
            model, processor = replica.captioner
            device = next(model.parameters()).device
            inputs = processor(images=picture, text=settings.prompt, return_tensors="pt").to(device)
            with torch.inference_mode():
                output = self.models.run_on_gpu(
                    lambda: model.generate(
                        **inputs,
                        max_new_tokens=settings.max_new_tokens,
                        min_new_tokens=settings.min_new_tokens or None,
                        num_beams=settings.num_beams,
                        repetition_penalty=settings.repetition_penalty,
                    ),
                    duration_s=zerogpu.DESCRIBE_DURATION_SECONDS,
                )
            text = processor.batch_decode(output, skip_special_tokens=True)[0]
        caption = tidy_caption(text)
        logger.info("described an image in %.2f s: %d characters", time.perf_counter() - started, len(caption))
        return caption
