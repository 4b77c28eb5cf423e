"""Which files the site serves (raw HTTP against a real server), upload size, temporary folder."""

from __future__ import annotations

import asyncio
import os
import time
import urllib.parse

import pytest
from PIL import Image

from kit import site as site_module
from kit.security.files import file_request_problem, sweep_old_files, temp_cleanup_lifespan
from tests.test_security_auth import request, site_preset
from tests.test_security_fetch import ImageServer

SECRET = "top-secret-line\n"


@pytest.fixture
def served(launch_site, tmp_path):
    """A running site with one gallery image, a secret file outside, and a symlink planted to it."""
    site = launch_site(site_preset())
    images = site.services.gallery.images_dir
    (images / "2026" / "01").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(images / "2026" / "01" / "ok.png")
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text(SECRET)
    (images / "2026" / "01" / "planted.png").symlink_to(secret)
    (images / "2026" / "planted-folder").symlink_to(secret.parent, target_is_directory=True)
    site.secret = secret
    return site


def file_path(path: str) -> str:
    return "/gradio_api/file=" + path


def test_gallery_image_served(served):
    path = served.services.gallery.images_dir / "2026" / "01" / "ok.png"
    status, body, _ = request(served, "GET", file_path(str(path)))
    assert status == 200
    assert body.startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "suffix",
    [
        "/../../outside/secret.txt",
        "/2026/../../../outside/secret.txt",
        "/%2e%2e/%2e%2e/outside/secret.txt",
        "/%2E%2E/%2E%2E/outside/secret.txt",
        "/%252e%252e/%252e%252e/outside/secret.txt",
        "/..%2f..%2foutside%2fsecret.txt",
        "/..%5c..%5coutside%5csecret.txt",
        "/2026/01/planted.png",
        "/2026/planted-folder/secret.txt",
        "/2026/01/ok.png%00.txt",
    ],
)
def test_traversal_refused(served, suffix):
    images = str(served.services.gallery.images_dir)
    status, body, _ = request(served, "GET", file_path(images + suffix))
    assert status in (403, 404)
    assert SECRET.encode() not in body


@pytest.mark.parametrize("name", ["gallery.sqlite3", "browser-state.key", "models", "../outside/secret.txt"])
def test_data_folder_files_refused(served, name):
    data_dir = served.services.data_dir
    status, body, _ = request(served, "GET", file_path(str(data_dir / name)))
    assert status in (403, 404)
    assert b"SQLite" not in body


@pytest.mark.parametrize("path", ["/etc/passwd", "/proc/self/environ", "etc/passwd", "//etc/passwd"])
def test_absolute_paths_outside_refused(served, path):
    for route in ("/gradio_api/file=", "/gradio_api/file/"):
        status, body, _ = request(served, "GET", route + path)
        assert status in (403, 404)
        assert b"root:" not in body


def test_file_route_never_fetches_urls(served):
    server = ImageServer()
    try:
        status, _, _ = request(served, "GET", file_path(f"http://127.0.0.1:{server.port}/image.png"))
        assert status == 403
        status, _, _ = request(served, "GET", file_path(urllib.parse.quote(f"http://127.0.0.1:{server.port}/image.png", safe="")))
        assert status == 403
        assert server.requests == []
    finally:
        server.close()


def test_path_policy_rules(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(b"x")
    (tmp_path / "other.txt").write_text("x")
    (root / "link.png").symlink_to(tmp_path / "other.txt")
    assert file_request_problem(str(root / "a.png"), str(root / "a.png"), [root]) is None
    assert "outside" in file_request_problem(str(tmp_path / "other.txt"), "", [root])
    assert "outside" in file_request_problem(str(root / "link.png"), "", [root])
    assert "'..'" in file_request_problem(f"{root}/../other.txt", "", [root])
    assert "'..'" in file_request_problem(str(root / "a.png"), f"{root}/%252e%252e/other.txt", [root])
    assert "NUL" in file_request_problem(f"{root}/a.png\x00", "", [root])
    assert "not absolute" in file_request_problem("a.png", "a.png", [root])
    assert "does not exist" in file_request_problem(str(root / "missing.png"), "", [root])
    assert "does not exist" in file_request_problem(str(root), "", [root])


def test_launch_options_bound_what_is_served(make_services):
    services = make_services(site_preset(max_upload_mb=5, temp_max_age_seconds=600))
    options = site_module.launch_options(services)
    assert options["allowed_paths"] == [str(services.gallery.images_dir)]
    blocked = set(options["blocked_paths"])
    assert str(services.data_dir / "gallery.sqlite3") in blocked
    assert str(services.data_dir / "browser-state.key") in blocked
    assert options["max_file_size"] == 5_000_000
    assert "auth" not in options
    assert callable(options["app_kwargs"]["lifespan"])
    assert site_module.queue_options(services)["api_open"] is False
    assert "lifespan" not in site_module.launch_options(make_services(site_preset(temp_max_age_seconds=0)))["app_kwargs"]


def test_upload_over_limit_refused(launch_site):
    site = launch_site(site_preset(max_upload_mb=0.05))
    boundary = "kitboundary"
    payload = b"\x00" * 80_000
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, body, _ = request(site, "POST", "/gradio_api/upload", headers, body)
    assert status == 413


def test_job_body_over_limit_refused(launch_site):
    site = launch_site(site_preset(max_upload_mb=0.05))
    body = b'{"data": ["' + b"a" * 2_000_000 + b'"]}'
    status, _, _ = request(site, "POST", "/gradio_api/call/generate", {"Content-Type": "application/json"}, body)
    assert status == 413


def test_sweep_deletes_only_old_files(tmp_path):
    old = tmp_path / "abc" / "old.png"
    new = tmp_path / "def" / "new.png"
    for path in (old, new):
        path.parent.mkdir()
        path.write_bytes(b"x")
    past = time.time() - 7200
    os.utime(old, (past, past))
    deleted = sweep_old_files(tmp_path, 3600, now=time.time() + 1)
    # ctime cannot be set back, so "now" is moved forward past the new file's ctime less the age.
    assert deleted == 0
    deleted = sweep_old_files(tmp_path, 3600, now=time.time() + 3601)
    assert deleted == 2
    assert not old.exists()
    assert not (tmp_path / "abc").exists()
    assert tmp_path.exists()


def test_lifespan_sweeps_temp_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    leftover = tmp_path / "upload" / "old.bin"
    leftover.parent.mkdir()
    leftover.write_bytes(b"x")

    async def run() -> None:
        async with temp_cleanup_lifespan(1)(None):
            for _ in range(40):
                if not leftover.exists():
                    return
                await asyncio.sleep(0.1)

    time.sleep(1.1)
    asyncio.run(run())
    assert not leftover.exists()
