"""Image inputs through a running site: bombs rejected from the header, memory flat, limits from the preset."""

from __future__ import annotations

import base64
import os
import threading
import time
from pathlib import Path

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import ValidationError
from PIL import Image

from tests.test_images import bomb_png
from tests.test_security_auth import site_preset
from tests.test_security_fetch import call

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class PeakMemory:
    """Sample this process's resident memory every few milliseconds; the server runs in-process."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.003)

    def __enter__(self) -> PeakMemory:
        self.baseline = resident_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def bombs(tmp_path) -> dict[str, Path]:
    files = {}
    for name, (width, height, colour_type) in {"30000-grey": (30000, 30000, 0), "30000-rgb": (30000, 30000, 2), "12000-grey": (12000, 12000, 0), "12000-rgba": (12000, 12000, 6)}.items():
        path = tmp_path / f"{name}.png"
        path.write_bytes(bomb_png(width, height, colour_type))
        files[name] = path
    return files


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc to measure memory")
def test_bombs_rejected_memory_flat(launch_site, bombs, tmp_path):
    site = launch_site(site_preset())
    client = site.client()
    warm = tmp_path / "warm.png"
    Image.new("RGB", (16, 16)).save(warm)
    client.predict(image=handle_file(str(warm)), api_name="/describe")  # load lazily imported code first

    messages = []
    with PeakMemory() as memory:
        for path in bombs.values():
            for endpoint, arguments in (("/describe", {"image": handle_file(str(path))}), ("/generate", {"prompt": "x", "init_image": handle_file(str(path))})):
                started = time.monotonic()
                with pytest.raises(ValidationError) as caught:
                    client.predict(api_name=endpoint, **arguments)
                messages.append(str(caught.value))
                assert time.monotonic() - started < 10
    for message in messages:
        assert "image too large" in message
        assert "the limit is 16,777,216 pixels" in message
    # The smallest of these decoded would take 137 MiB (12000 x 12000 grey, one byte a pixel).
    assert memory.peak - memory.baseline < 100 * 2**20


def test_bomb_as_data_url_rejected_with_422(launch_site):
    site = launch_site(site_preset())
    url = "data:image/png;base64," + base64.b64encode(bomb_png(30000, 30000)).decode()
    status, detail = call(site, "describe", [url])
    assert status == 422
    assert "image too large" in detail["detail"][0]["message"]
    status, detail = call(site, "generate", ["x", "", 1, 2, 5.0, 64, 64, 1, url, 0.6])
    assert status == 422
    assert detail["detail"][0]["parameter_name"] == "init_image"


def test_pixel_limit_from_preset(launch_site, tmp_path):
    site = launch_site(site_preset(max_input_pixels=100 * 100))
    client = site.client()
    large = tmp_path / "large.png"
    Image.new("RGBA", (101, 100), (1, 2, 3, 255)).save(large)
    with pytest.raises(ValidationError, match=r"image too large \(101x100 = 10,100 pixels\); the limit is 10,000 pixels"):
        client.predict(image=handle_file(str(large)), api_name="/describe")
    small = tmp_path / "small.png"
    Image.new("RGBA", (100, 100), (1, 2, 3, 255)).save(small)
    assert isinstance(client.predict(image=handle_file(str(small)), api_name="/describe"), str)


@pytest.mark.parametrize(("name", "content", "message"), [("notes.txt", b"hello", "not an image in an accepted format"), ("cut.png", None, "damaged")])
def test_bad_files_rejected_before_queue(launch_site, tmp_path, name, content, message):
    site = launch_site(site_preset())
    path = tmp_path / name
    if content is None:
        full = tmp_path / "full.png"
        Image.effect_noise((64, 64), 40).convert("RGB").save(full)
        content = full.read_bytes()[:300]
    path.write_bytes(content)
    with pytest.raises(ValidationError, match=message):
        site.client().predict(image=handle_file(str(path)), api_name="/describe")
    assert not site.services.models.is_loaded()
