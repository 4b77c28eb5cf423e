"""Open visitor images safely: check the header before decoding, then normalise the pixels."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from kit.errors import InvalidRequest

logger = logging.getLogger(__name__)

# Pillow decoders tried on visitor files; no other format's parser reads one.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# MPO is what Pillow's JPEG decoder reports for many phone photos (a JPEG with extra frames);
# the first frame is used.
ALLOWED_RESULT_FORMATS = (*ALLOWED_FORMATS, "MPO")
FORMAT_NAMES = "PNG, JPEG, WebP, GIF or BMP"
# The default limit; a preset sets its own with `security.max_input_pixels`. Pillow's own bomb
# check (about 89 million pixels) stays on as a second line behind this one.
MAX_INPUT_PIXELS = 4096 * 4096
_PILLOW_PIXELS = re.compile(r"\((\d+) pixels\)")


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _too_large(parameter: str, max_pixels: int, width: int = 0, height: int = 0, pixels: int = 0) -> InvalidRequest:
    if width and height:
        size = f"{width}x{height} = {width * height:,} pixels"
    elif pixels:
        size = f"{pixels:,} pixels"
    else:
        size = "more pixels than Pillow opens"
    return InvalidRequest(parameter, f"{parameter}: image too large ({size}); the limit is {max_pixels:,} pixels.")


def read_header(path: str | Path, parameter: str, max_pixels: int = MAX_INPUT_PIXELS) -> ImageHeader:
    """Read an image's format and size from its header, without decoding any pixels.

    Raises InvalidRequest when the file is not an image in an allowed format or declares more
    than ``max_pixels`` pixels. A few hundred KB can declare a 30000x30000 canvas, so this
    runs before anything allocates the pixels.
    """
    try:
        with Image.open(path, formats=ALLOWED_FORMATS) as probe:
            header = ImageHeader(str(probe.format), *probe.size)
    # Pillow refuses twice its own limit and warns above it; the warning arrives as an exception
    # only where warnings are errors (as in the tests). The preset's ceiling is below both.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        match = _PILLOW_PIXELS.search(str(exc))
        raise _too_large(parameter, max_pixels, pixels=int(match.group(1)) if match else 0) from None
    except UnidentifiedImageError:
        raise InvalidRequest(parameter, f"{parameter}: the file is not an image in an accepted format ({FORMAT_NAMES}).") from None
    except FileNotFoundError:
        raise InvalidRequest(parameter, f"{parameter}: the uploaded file was not found; upload it again.") from None
    except Exception as exc:  # Pillow's parsers raise many types on malformed headers.
        raise InvalidRequest(parameter, f"{parameter}: the file is not an image that can be read ({exc}).") from None
    if header.format not in ALLOWED_RESULT_FORMATS:
        raise InvalidRequest(parameter, f"{parameter}: the file is not an image in an accepted format ({FORMAT_NAMES}).")
    if header.width < 1 or header.height < 1:
        raise InvalidRequest(parameter, f"{parameter}: the image declares an empty size ({header.width}x{header.height}).")
    if header.pixels > max_pixels:
        raise _too_large(parameter, max_pixels, header.width, header.height)
    return header


def open_image(path: str | Path, parameter: str, max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """Open an uploaded image as RGB, rejecting bombs, unknown formats and corrupt files.

    Only the header is read before the pixel count is checked, so a small file that declares
    a huge canvas is rejected without allocating it. EXIF orientation is applied, the first
    frame of an animation is used, and palette, alpha, CMYK and 16-bit modes become RGB.
    Raises only InvalidRequest for a bad file.
    """
    read_header(path, parameter, max_pixels)
    try:
        with Image.open(path, formats=ALLOWED_FORMATS) as image:
            image.seek(0)
            image.load()
            # Orientation is applied after the pixel check, and a rotation keeps the pixel count.
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except InvalidRequest:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # truncated data, bad EXIF, broken frames: Pillow raises many types
        logger.info("rejected an undecodable %s upload: %s: %s", parameter, type(exc).__name__, exc)
        raise InvalidRequest(parameter, f"{parameter}: the image is damaged and cannot be decoded ({exc}).") from None


_HIGH_BIT_DEPTH = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _HIGH_BIT_DEPTH:
        # 16-bit grey: keep the top 8 bits rather than clipping everything above 255 to white.
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    elif image.mode == "F":
        image = image.convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent areas become white, the usual background for a pasted image.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def fit_to_size(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale and centre-crop ``image`` to exactly ``width`` x ``height`` without distorting it."""
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
