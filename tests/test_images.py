"""Opening visitor images: header checks before decoding, formats, modes, damaged files."""

from __future__ import annotations

import io
import resource
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from kit.errors import InvalidRequest
from kit.images import MAX_INPUT_PIXELS, open_image, read_header


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int, colour_type: int = 0, rows: int = 500) -> bytes:
    """Return a valid-looking PNG that declares width x height but carries only ``rows`` rows of data."""
    channels = {0: 1, 2: 3, 6: 4}[colour_type]
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * ((width * channels + 1) * rows), 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize(("width", "height", "colour_type"), [(30000, 30000, 0), (30000, 30000, 2), (12000, 12000, 0), (12000, 12000, 6)])
def test_bomb_rejected_from_header(tmp_path, width, height, colour_type):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(width, height, colour_type))
    assert path.stat().st_size < 1_000_000
    before = max_rss_mib()
    with pytest.raises(InvalidRequest, match="image too large") as caught:
        open_image(path, "init_image")
    assert f"the limit is {MAX_INPUT_PIXELS:,} pixels" in caught.value.message
    assert caught.value.parameter == "init_image"
    # Decoding even one of these would take hundreds of MiB (12000 x 12000 grey is 137 MiB).
    assert max_rss_mib() - before < 50


def test_bomb_message_gives_pixel_count(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(12000, 12000))
    # Where warnings are errors (as here) Pillow's bomb warning stops the header read, so the
    # message has the pixel count from Pillow's message instead of the width and height.
    with pytest.raises(InvalidRequest, match=r"image too large \((12000x12000 = )?144,000,000 pixels\)"):
        read_header(path, "image")


def test_preset_pixel_limit_applies(tmp_path):
    path = save(Image.new("RGB", (300, 200)), tmp_path / "small.png")
    assert read_header(path, "image", max_pixels=60_000).pixels == 60_000
    with pytest.raises(InvalidRequest, match="300x200 = 60,000 pixels.*limit is 59,999"):
        open_image(path, "image", max_pixels=59_999)


def test_jpeg_bomb_rejected(tmp_path):
    data = bytearray(Image.new("RGB", (16, 16), "red").tobytes())
    buffer = io.BytesIO()
    Image.frombytes("RGB", (16, 16), bytes(data)).save(buffer, "JPEG")
    raw = bytearray(buffer.getvalue())
    start = raw.index(b"\xff\xc0")  # baseline start-of-frame: length, precision, height, width
    raw[start + 5 : start + 9] = struct.pack(">HH", 60000, 60000)
    path = tmp_path / "bomb.jpg"
    path.write_bytes(bytes(raw))
    with pytest.raises(InvalidRequest, match="image too large"):
        open_image(path, "image")


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_allowed_formats_open_as_rgb(tmp_path, image_format):
    path = save(Image.new("RGB", (40, 30), (200, 10, 10)), tmp_path / f"x.{image_format.lower()}", format=image_format)
    image = open_image(path, "image")
    assert image.mode == "RGB"
    assert image.size == (40, 30)


@pytest.mark.parametrize("image_format", ["TIFF", "ICO", "PPM", "TGA"])
def test_other_formats_rejected(tmp_path, image_format):
    path = save(Image.new("RGB", (16, 16)), tmp_path / f"x.{image_format.lower()}", format=image_format)
    with pytest.raises(InvalidRequest, match=r"not an image in an accepted format \(PNG, JPEG, WebP, GIF or BMP\)"):
        open_image(path, "image")


def test_svg_and_text_rejected(tmp_path):
    svg = tmp_path / "x.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    with pytest.raises(InvalidRequest, match="not an image in an accepted format"):
        open_image(svg, "image")


def test_exif_orientation_applied(tmp_path):
    image = Image.new("RGB", (40, 20), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(image, tmp_path / "rotated.jpg", exif=exif)
    assert open_image(path, "image").size == (20, 40)


def test_palette_with_transparency_becomes_white(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    image.info["transparency"] = 0
    path = save(image, tmp_path / "p.png", transparency=0)
    assert open_image(path, "image").getpixel((0, 0)) == (255, 255, 255)


def test_alpha_composited_on_white(tmp_path):
    path = save(Image.new("RGBA", (8, 8), (0, 0, 255, 0)), tmp_path / "a.png")
    assert open_image(path, "image").getpixel((3, 3)) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg", format="JPEG")
    red, green, blue = open_image(path, "image").getpixel((4, 4))
    assert red > 200
    assert green < 60
    assert blue < 60


def test_16_bit_grey_keeps_levels(tmp_path):
    levels = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    path = save(Image.fromarray(levels), tmp_path / "g16.png")
    pixels = np.asarray(open_image(path, "image"))
    assert pixels.max() == 63_000 // 256
    assert pixels.min() == 0


def test_animation_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    red, green, blue = open_image(path, "image").getpixel((4, 4))
    assert red > 200
    assert green < 50


def test_truncated_png_rejected(tmp_path):
    full = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(full, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    with pytest.raises(InvalidRequest, match="damaged"):
        open_image(path, "image")


def test_truncated_jpeg_rejected(tmp_path):
    full = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(full, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(full.getvalue()[: len(full.getvalue()) // 3])
    with pytest.raises(InvalidRequest, match="damaged"):
        open_image(path, "image")


def test_empty_and_missing_files_rejected(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InvalidRequest, match="not an image in an accepted format"):
        open_image(empty, "image")
    with pytest.raises(InvalidRequest, match="not found"):
        open_image(tmp_path / "missing.png", "image")


def _sample(image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((24, 16), 40).convert("RGB").save(buffer, image_format)
    return buffer.getvalue()


SAMPLES = {name: _sample(name) for name in ("PNG", "JPEG", "GIF", "BMP", "WEBP")}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def check_only_invalid_request(path: Path) -> None:
    try:
        image = open_image(path, "image", max_pixels=256 * 256)
    except InvalidRequest:
        return
    assert image.mode == "RGB"
    assert image.width * image.height <= 256 * 256


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_raise_only_invalid_request(tmp_path, data):
    path = tmp_path / "random.bin"
    path.write_bytes(data)
    check_only_invalid_request(path)


@FUZZ
@given(
    image_format=st.sampled_from(sorted(SAMPLES)),
    edits=st.lists(st.tuples(st.integers(min_value=0, max_value=63), st.integers(min_value=0, max_value=255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=400)),
)
def test_mutated_headers_raise_only_invalid_request(tmp_path, image_format, edits, cut):
    data = bytearray(SAMPLES[image_format])
    for offset, value in edits:  # the first 64 bytes hold the signature and the size fields
        if offset < len(data):
            data[offset] = value
    if cut is not None:
        data = data[:cut]
    path = tmp_path / f"mutated.{image_format.lower()}"
    path.write_bytes(bytes(data))
    check_only_invalid_request(path)


@FUZZ
@given(width=st.integers(min_value=0, max_value=2**31 - 1), height=st.integers(min_value=0, max_value=2**31 - 1))
def test_declared_png_sizes_checked_before_decoding(tmp_path, width, height):
    path = tmp_path / "declared.png"
    path.write_bytes(bomb_png(width, height, rows=0))
    try:
        image = open_image(path, "image", max_pixels=64 * 64)
    except InvalidRequest:
        return
    assert image.width * image.height <= 64 * 64
