"""Open visitor images safely: check the header before decoding, then normalise the pixels."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from kit.errors import InvalidRequest

logger = logging.getLogger(__name__)

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# Pillow's own bomb check stays on as a second line; the kit's limit is lower and checked first.
MAX_INPUT_PIXELS = 4096 * 4096


def open_image(path: str | Path, parameter: str, max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """Open an uploaded image as RGB, rejecting bombs, unknown formats and corrupt files.

    Only the header is read before the pixel count is checked, so a small file that declares
    a huge canvas is rejected without allocating it. EXIF orientation is applied, the first
    frame of an animation is used, and palette, alpha, CMYK and 16-bit modes become RGB.
    """
    try:
        with Image.open(path) as probe:
            image_format = probe.format
            width, height = probe.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(parameter, f"{parameter}: the file is not an image that can be read ({exc}).") from None
    if image_format not in ALLOWED_FORMATS:
        raise InvalidRequest(
            parameter, f"{parameter}: format {image_format} is not accepted; use one of {', '.join(ALLOWED_FORMATS)}."
        )
    if width * height > max_pixels:
        raise InvalidRequest(
            parameter,
            f"{parameter}: image too large ({width}x{height} = {width * height:,} pixels); "
            f"the limit is {max_pixels:,} pixels.",
        )
    try:
        with Image.open(path) as image:
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(parameter, f"{parameter}: the image is damaged and cannot be decoded ({exc}).") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def fit_to_size(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale and centre-crop ``image`` to exactly ``width`` x ``height`` without distorting it."""
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
