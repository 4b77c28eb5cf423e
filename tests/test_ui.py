"""UI helpers that have no browser of their own to test them: settings reuse, the logo and Stop."""

from __future__ import annotations

import base64
import logging
import threading
import time
from typing import Any

import pytest
from PIL import Image

from kit.errors import PresetError
from kit.generate import GenerationJob, GenerationRequest
from kit.site import MAX_LOGO_BYTES, _logo_src
from kit.ui.generator import SessionJobs
from kit.ui.settings import reusable_settings, settings_from_png
from tests.conftest import demo_preset


def test_reuse_keeps_values_in_range():
    values, notes = reusable_settings({"prompt": "a cat", "seed": 9, "steps": 5, "width": 128, "height": 64}, demo_preset())
    assert values == {"prompt": "a cat", "seed": 9, "steps": 5, "width": 128, "height": 64}
    assert notes == []


def test_reuse_clamps_to_site_limits():
    values, notes = reusable_settings({"steps": 900, "width": 4096, "guidance_scale": 99.0}, demo_preset())
    assert values["steps"] == 200
    assert values["width"] == 512
    assert values["guidance_scale"] == 20.0
    assert len(notes) == 3
    assert "steps 900 is outside this site's range 1 to 200, so it is 200" in notes


def test_reuse_drops_values_of_wrong_type():
    values, notes = reusable_settings({"seed": "lucky", "prompt": 42, "steps": True}, demo_preset())
    assert values == {}
    assert len(notes) == 3


def test_reuse_cuts_long_prompt():
    values, notes = reusable_settings({"prompt": "x" * 5000}, demo_preset())
    assert len(values["prompt"]) == 1000
    assert "1,000 characters" in notes[0]


def test_settings_from_png_ignores_other_files(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    text = tmp_path / "notes.txt"
    text.write_text("hello", encoding="utf-8")
    assert settings_from_png(plain) is None
    assert settings_from_png(text) is None


def test_logo_becomes_data_url(tmp_path):
    logo = tmp_path / "logo.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(logo)
    preset_file = tmp_path / "site.toml"
    preset_file.write_text("", encoding="utf-8")
    src = _logo_src("logo.png", str(preset_file))
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1]) == logo.read_bytes()


def test_logo_url_passes_through():
    assert _logo_src("https://example.com/logo.svg", "test") == "https://example.com/logo.svg"


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("missing.png", None, "not found"),
        ("logo.exe", b"MZ", "file or an https:// URL"),
        ("huge.png", b"0" * (MAX_LOGO_BYTES + 1), "the limit is"),
    ],
)
def test_bad_logo_stops_startup(tmp_path, name, content, fragment):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    preset_file = tmp_path / "site.toml"
    preset_file.write_text("", encoding="utf-8")
    with pytest.raises(PresetError) as caught:
        _logo_src(name, str(preset_file))
    assert "site.logo" in str(caught.value)
    assert fragment in str(caught.value)


def _handler_thread(job: GenerationJob, remove: Any, delay: float) -> threading.Thread:
    """Stand in for a generate handler: end once the job is cancelled, after ``delay`` seconds."""

    def run() -> None:
        job.cancelled.wait()
        time.sleep(delay)
        job.finish_cancelled()
        remove()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_stop_waits_for_session_handlers():
    session_jobs = SessionJobs()
    mine = GenerationJob(GenerationRequest(prompt="mine"), owner="a")
    other = GenerationJob(GenerationRequest(prompt="other"), owner="b")
    _handler_thread(mine, session_jobs.add("session-a", mine), delay=0.3)
    session_jobs.add("session-b", other)

    stopped = session_jobs.stop("session-a", timeout=10)

    assert stopped == [mine]
    # Stop returned only after the handler had ended, so no update of it can follow the reply.
    assert mine.finished.is_set()
    assert session_jobs.stop("session-a") == []
    assert not other.cancelled.is_set()


def test_stop_times_out_on_stuck_handler(caplog):
    session_jobs = SessionJobs()
    job = GenerationJob(GenerationRequest(prompt="stuck"), owner="a")
    session_jobs.add("session-a", job)

    with caplog.at_level(logging.WARNING):
        assert session_jobs.stop("session-a", timeout=0.2) == [job]

    assert job.cancelled.is_set()
    assert "timed out after 0.2 s waiting for the stopped jobs of session session-a" in caplog.text


def test_stop_without_session_does_nothing():
    session_jobs = SessionJobs()
    job = GenerationJob(GenerationRequest(prompt="no session"), owner="a")
    session_jobs.add(None, job)
    assert session_jobs.stop(None) == []
    assert not job.cancelled.is_set()
