"""Saved settings back into the generator: from a gallery entry or from a PNG the site wrote.

A gallery PNG carries its settings in a ``parameters`` text chunk. The values may come from
an older preset or from an edited file, so each one is type-checked and clamped to this
site's limits before it reaches a control. The validator still checks the job as usual.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kit.gallery import read_png_parameters
from kit.generate import MAX_SEED
from kit.presets import Preset

logger = logging.getLogger(__name__)

# Settings that "Reuse settings" copies back into the generator, in the generator's names.
REUSED_SETTINGS = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return value


def reusable_settings(parameters: dict[str, Any], preset: Preset) -> tuple[dict[str, Any], list[str]]:
    """Return the settings that fit the generator's controls, and a note for each value changed or dropped.

    Text is cut to the prompt limit and numbers are clamped to the preset's limits. A value of
    the wrong type is dropped, so its control keeps what the visitor had.
    """
    lim = preset.generator.limits
    ranges = {
        "seed": (0, MAX_SEED),
        "steps": (lim.min_steps, lim.max_steps),
        "guidance_scale": (0.0, lim.max_guidance_scale),
        "width": (lim.min_size, lim.max_size),
        "height": (lim.min_size, lim.max_size),
    }
    values: dict[str, Any] = {}
    notes: list[str] = []
    for name in REUSED_SETTINGS:
        if name not in parameters or parameters[name] is None:
            continue
        raw = parameters[name]
        if name in ("prompt", "negative_prompt"):
            if not isinstance(raw, str):
                notes.append(f"{name} was not text and was left as it was")
                continue
            values[name] = raw[: lim.max_prompt_chars]
            if len(raw) > lim.max_prompt_chars:
                notes.append(f"{name} was cut to this site's limit of {lim.max_prompt_chars:,} characters")
            continue
        number = _number(raw)
        if number is None:
            notes.append(f"{name} {raw!r} is not a number and was left as it was")
            continue
        low, high = ranges[name]
        clamped = min(max(number, low), high)
        if clamped != number:
            notes.append(f"{name} {number:g} is outside this site's range {low:g} to {high:g}, so it is {clamped:g}")
        values[name] = int(clamped) if name != "guidance_scale" else float(clamped)
    return values, notes


def settings_from_png(path: str | Path) -> dict[str, Any] | None:
    """Return the settings a PNG from this kit carries, or None for any other image or file."""
    try:
        return read_png_parameters(path)
    except (OSError, SyntaxError, ValueError) as exc:  # not an image Pillow can open
        logger.info("no settings read from an uploaded file: %s", exc)
        return None


def describe_settings(parameters: dict[str, Any]) -> str:
    """Return a one-line summary of saved settings for the visitor, such as the prompt and seed."""
    prompt = str(parameters.get("prompt", "")).strip()
    if len(prompt) > 80:
        prompt = prompt[:79] + "…"
    parts = [f"“{prompt}”" if prompt else "no prompt"]
    if parameters.get("seed") is not None:
        parts.append(f"seed {parameters['seed']}")
    if parameters.get("steps") is not None:
        parts.append(f"{parameters['steps']} steps")
    if parameters.get("width") and parameters.get("height"):
        parts.append(f"{parameters['width']}x{parameters['height']}")
    return ", ".join(parts)
