from __future__ import annotations

import pytest
from PIL import Image

from kit.describe import tidy_caption
from kit.errors import InvalidRequest


def test_tidy_caption_drops_repeats_and_dangling_words():
    assert tidy_caption("a red red circle on a") == "a red circle"
    assert tidy_caption("  a  cat with  ") == "a cat"


def test_describe_returns_text(make_services, tmp_path):
    services = make_services()
    path = tmp_path / "in.png"
    Image.new("RGB", (40, 30), (255, 0, 0)).save(path)
    caption = services.describer.describe(str(path))
    assert isinstance(caption, str)
    assert caption
    assert len(caption.split()) <= services.preset.describe.max_new_tokens


def test_describe_rejects_non_images(make_services, tmp_path):
    services = make_services()
    path = tmp_path / "not.png"
    path.write_bytes(b"hello")
    with pytest.raises(InvalidRequest, match="not an image"):
        services.describer.check(str(path))
