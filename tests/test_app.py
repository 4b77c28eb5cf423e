"""app.py as a new user runs it: a real process, a real port, the demo preset by default."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kit.errors import ModelUnavailable
from tests.conftest import demo_preset

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"app.py exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@pytest.fixture
def app_process(tmp_path, models_cache):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(models_cache, data / "models")
    port = free_port()
    env = {**os.environ, "KIT_DATA_DIR": str(data), "PYTHONUNBUFFERED": "1"}
    env.pop("KIT_PRESET", None)
    log = open(tmp_path / "app.log", "w+", encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield f"http://127.0.0.1:{port}", process, tmp_path / "app.log", data
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_app_starts_demo_without_gpu(app_process):
    url, process, log_path, data = app_process
    wait_until_serving(url + "/", process)
    log = log_path.read_text(encoding="utf-8")
    assert "no GPU was found, so this site runs the demo preset" in log
    with urllib.request.urlopen(url + "/config", timeout=10) as response:
        config = json.loads(response.read())
    assert "runs the demo preset" in json.dumps(config)

    from gradio_client import Client

    _, record, _ = Client(url, verbose=False).predict(prompt="a red circle", seed=3, api_name="/generate")
    assert record["seeds"] == [3]
    assert (data / "gallery.sqlite3").is_file()
    log = log_path.read_text(encoding="utf-8")
    assert "loaded generator builtin:" in log
    assert "MiB of weights" in log


def test_bad_preset_stops_startup(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[queue]\nmax_size = 0\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "app.py", "--preset", str(bad), "--data-dir", str(tmp_path / "d")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "queue.max_size = 0" in result.stderr
    assert str(bad) in result.stderr


def test_import_builds_nothing():
    code = "import app, sys; print('kit.site' in sys.modules, 'gradio' in sys.modules, 'torch' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert output.stdout.split() == ["False", "False", "False"]


def test_uncached_hub_model_fails_fast(make_services):
    services = make_services(demo_preset(generator={"model": "stabilityai/sdxl-turbo"}))
    started = time.monotonic()
    from kit.generate import GenerationRequest

    with pytest.raises(ModelUnavailable) as caught:
        services.generator.generate(GenerationRequest(prompt="x", steps=2, width=128, height=128))
    assert time.monotonic() - started < 10
    assert "stabilityai/sdxl-turbo" in str(caught.value)
    assert "hf download stabilityai/sdxl-turbo" in str(caught.value)
