"""Gallery integrity when the disk fails: no partial entries, no temporary files, site keeps serving."""

from __future__ import annotations

import errno
import json
import sqlite3
import urllib.request

import pytest
from gradio_client.exceptions import AppError
from PIL import Image

from kit.errors import GalleryError
from kit.gallery import GalleryStore, write_png
from tests.test_security_auth import site_preset

SETTINGS = {"prompt": "a red circle", "seed": 1, "steps": 2, "guidance_scale": 5.0, "width": 8, "height": 8}


def disk_full(image, handle, parameters_json):
    handle.write(b"\x89PNG partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def files_under(folder):
    return sorted(path.name for path in folder.rglob("*") if path.is_file())


def test_full_disk_leaves_nothing(tmp_path):
    store = GalleryStore(tmp_path, write_image=disk_full).open()
    with pytest.raises(GalleryError, match="disk is full.*nothing was kept"):
        store.add(Image.new("RGB", (8, 8)), SETTINGS, "user:alice")
    assert store.count() == 0
    assert files_under(store.images_dir) == []


def test_failed_image_removes_whole_job(tmp_path):
    calls = []

    def second_fails(image, handle, parameters_json):
        calls.append(parameters_json)
        if len(calls) == 2:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        write_png(image, handle, parameters_json)

    store = GalleryStore(tmp_path, write_image=second_fails).open()
    images = [(Image.new("RGB", (8, 8)), {**SETTINGS, "seed": seed}) for seed in (1, 2, 3)]
    with pytest.raises(GalleryError, match="disk is full"):
        store.add_many(images, "user:alice")
    assert store.count() == 0
    assert files_under(store.images_dir) == []


def test_index_failure_removes_files(tmp_path):
    store = GalleryStore(tmp_path).open()
    with sqlite3.connect(store.db_path) as conn:
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON entries BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    images = [(Image.new("RGB", (8, 8)), {**SETTINGS, "seed": seed}) for seed in (1, 2)]
    with pytest.raises(GalleryError, match="could not index"):
        store.add_many(images, "user:alice")
    assert files_under(store.images_dir) == []
    with sqlite3.connect(store.db_path) as conn:
        conn.execute("DROP TRIGGER refuse")
    assert [entry.parameters["seed"] for entry in store.add_many(images, "user:alice")] == [1, 2]
    assert store.count() == 2


def test_other_writer_errors_also_clean_up(tmp_path):
    def broken(image, handle, parameters_json):
        handle.write(b"partial")
        raise ValueError("encoder failed")

    store = GalleryStore(tmp_path, write_image=broken).open()
    with pytest.raises(ValueError, match="encoder failed"):
        store.add(Image.new("RGB", (8, 8)), SETTINGS, "user:alice")
    assert files_under(store.images_dir) == []


def test_full_disk_job_fails_and_site_keeps_serving(launch_site):
    site = launch_site(site_preset())
    gallery = site.services.gallery
    client = site.client()
    gallery.write_image = disk_full
    with pytest.raises(AppError, match="disk is full"):
        client.predict(prompt="a red circle", seed=1, api_name="/generate")
    assert gallery.count() == 0
    assert files_under(gallery.images_dir) == []

    with urllib.request.urlopen(f"{site.url}healthz", timeout=10) as response:
        assert json.load(response) == {"status": "ok"}
    gallery.write_image = write_png
    _, record, _ = client.predict(prompt="a red circle", seed=1, api_name="/generate")
    assert len(record["entry_ids"]) == 1
    assert gallery.count() == 1
