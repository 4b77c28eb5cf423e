"""Shared fixtures: offline environment, tiny models built once, real in-process servers."""

from __future__ import annotations

import os

# Set before gradio, huggingface_hub or transformers are imported anywhere in the test run.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_SERVER_NAME", "127.0.0.1")
# The tiny test models gain nothing from a second thread, and on a shared machine two
# OpenMP threads that wait for each other run many times slower than one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import ipaddress
import shutil
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kit.presets import Preset, parse_preset

OUTSIDE_CONNECTIONS: list[Any] = []
_original_connect = socket.socket.connect
_original_connect_ex = socket.socket.connect_ex


def _is_local(address: Any) -> bool:
    if isinstance(address, str | bytes):  # a Unix socket path
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _guarded_connect(self: socket.socket, address: Any) -> Any:
    if not _is_local(address):
        OUTSIDE_CONNECTIONS.append(address)
        raise OSError(f"test run tried to reach an outside host: {address!r}")
    return _original_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> Any:
    if not _is_local(address):
        OUTSIDE_CONNECTIONS.append(address)
        raise OSError(f"test run tried to reach an outside host: {address!r}")
    return _original_connect_ex(self, address)


# Every socket the test process opens goes through this guard; test_no_outside_host reads it.
socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def models_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the tiny models once per run; each data folder gets a copy of this folder."""
    from kit.tiny import BUILDERS, ensure_tiny_model

    folder = tmp_path_factory.mktemp("models-cache") / "models"
    for name in BUILDERS:
        ensure_tiny_model(name, folder)
    return folder


@pytest.fixture
def data_dir(tmp_path: Path, models_cache: Path) -> Path:
    folder = tmp_path / "data"
    shutil.copytree(models_cache, folder / "models")
    return folder


# The preset most tests start from: the shipped demo's shape with the tiny random-weight
# models, which load in a fraction of a second. Tests of the trained demo models read
# presets/demo.toml itself.
TEST_PRESET = """
name = "demo"

[site]
title = "Microsite Kit test site"
description = "Tiny random-weight models."
footer = "Built with Microsite Kit."
examples = ["a red circle on a blue background", "a green square"]

[generator]
model = "builtin:tiny-sd"

[generator.defaults]
steps = 8
guidance_scale = 5.0
width = 128
height = 128

[generator.limits]
min_size = 64
max_size = 512
max_steps = 200
max_num_images = 4

[describe]
model = "builtin:tiny-blip"
max_new_tokens = 12
num_beams = 1

[queue]
max_size = 20

[memory]
idle_unload_seconds = 600
"""


def demo_preset(**overrides: Any) -> Preset:
    """Return the test preset with some sections replaced, e.g. queue={"max_size": 2}."""
    data = tomllib.loads(TEST_PRESET)
    for section, values in overrides.items():
        if isinstance(values, dict):
            merged = dict(data.get(section, {}))
            for key, value in values.items():
                if isinstance(value, dict):
                    merged[key] = {**merged.get(key, {}), **value}
                else:
                    merged[key] = value
            data[section] = merged
        else:
            data[section] = values
    return parse_preset(data, source="test", name="demo")


@pytest.fixture
def make_services(data_dir: Path):
    from kit.services import build_services

    created = []

    def factory(preset: Preset | None = None, folder: Path | None = None):
        services = build_services(preset or demo_preset(), folder or data_dir, devices=["cpu"])
        created.append(services)
        return services

    yield factory
    for services in created:
        services.close()


class RunningSite:
    def __init__(self, demo: Any, services: Any):
        self.demo = demo
        self.services = services
        self.url = demo.local_url

    def client(self, **kwargs: Any):
        from gradio_client import Client

        return Client(self.url, verbose=False, **kwargs)


@pytest.fixture
def launch_site(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Start a real Gradio server in this process for a preset; close it after the test."""
    from kit import site as site_module
    from kit.services import build_services

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-tmp"))
    running: list[RunningSite] = []

    def factory(preset: Preset | None = None, folder: Path | None = None) -> RunningSite:
        services = build_services(preset or demo_preset(), folder or data_dir, devices=["cpu"])
        demo = site_module.build(services)
        demo.queue(**site_module.queue_options(services))
        options = site_module.launch_options(services)
        demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True, **options)
        site = RunningSite(demo, services)
        running.append(site)
        return site

    yield factory
    for site in running:
        site.demo.close()
        site.services.close()
