from __future__ import annotations

import json
import os
import sqlite3
import threading

import pytest
from PIL import Image

from kit.errors import GalleryError
from kit.gallery import SHARED_OWNER, GalleryStore, read_png_parameters


def settings(seed: int, prompt: str = "a red circle") -> dict:
    return {
        "prompt": prompt,
        "negative_prompt": "",
        "seed": seed,
        "steps": 4,
        "guidance_scale": 5.0,
        "width": 64,
        "height": 64,
        "strength": None,
        "mode": "text2image",
        "model": "builtin:tiny-sd",
        "scheduler": "DDIMScheduler",
        "kit_version": "test",
        "num_images": 1,
    }


def image(colour=(200, 10, 10)) -> Image.Image:
    return Image.new("RGB", (64, 64), colour)


class Clock:
    def __init__(self, start: float = 1_780_000_000.0):
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_add_writes_png_with_parameters(tmp_path):
    store = GalleryStore(tmp_path).open()
    entry = store.add(image(), settings(42), owner="browser:a")
    assert entry.path.is_file()
    assert entry.path.parent.parent.parent == store.images_dir  # images/YYYY/MM/
    stored = read_png_parameters(entry.path)
    assert stored["seed"] == 42
    assert stored["prompt"] == "a red circle"


def test_list_is_newest_first_and_paginated(tmp_path):
    store = GalleryStore(tmp_path, clock=Clock()).open()
    ids = [store.add(image(), settings(i), owner="browser:a").id for i in range(5)]
    first = store.list("browser:a", page=1, page_size=2)
    assert [e.id for e in first.entries] == [ids[4], ids[3]]
    assert first.total == 5
    assert first.pages == 3
    last = store.list("browser:a", page=3, page_size=2)
    assert [e.id for e in last.entries] == [ids[0]]


def test_private_scope_hides_other_owners(tmp_path):
    store = GalleryStore(tmp_path).open()
    store.add(image(), settings(1), owner="browser:a")
    store.add(image(), settings(2), owner="browser:b")
    assert [e.parameters["seed"] for e in store.list("browser:a").entries] == [1]
    assert store.list(SHARED_OWNER).total == 2
    with pytest.raises(GalleryError, match="not found"):
        store.get(store.list("browser:b").entries[0].id, "browser:a")


def test_delete_only_by_owner(tmp_path):
    store = GalleryStore(tmp_path).open()
    entry = store.add(image(), settings(1), owner="browser:a")
    with pytest.raises(GalleryError, match="only the visitor who made"):
        store.delete(entry.id, "browser:b")
    store.delete(entry.id, "browser:a")
    assert not entry.path.exists()
    assert store.list("browser:a").total == 0


def test_entries_survive_reopen(tmp_path):
    store = GalleryStore(tmp_path).open()
    entry = store.add(image(), settings(2**53 - 1), owner="browser:a")
    reopened = GalleryStore(tmp_path).open()
    listed = reopened.list("browser:a").entries
    assert [e.id for e in listed] == [entry.id]
    assert listed[0].parameters["seed"] == 2**53 - 1


def test_index_uses_wal(tmp_path):
    GalleryStore(tmp_path).open()
    mode = sqlite3.connect(tmp_path / "gallery.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_failed_index_write_leaves_no_file(tmp_path):
    store = GalleryStore(tmp_path).open()
    bad = settings(1)
    bad["steps"] = "many"  # int() fails before the row is written
    with pytest.raises(ValueError):
        store.add(image(), bad, owner="browser:a")
    assert list(store.images_dir.rglob("*.png")) == []


def test_crash_leftovers_are_swept_and_never_listed(tmp_path):
    store = GalleryStore(tmp_path).open()
    folder = store.images_dir / "2026" / "12"
    folder.mkdir(parents=True)
    leftover = folder / ".tmp-deadbeef.png"
    leftover.write_bytes(b"partial")
    GalleryStore(tmp_path).open()
    assert not leftover.exists()


def test_missing_file_is_left_out(tmp_path):
    store = GalleryStore(tmp_path).open()
    kept = store.add(image(), settings(1), owner="browser:a")
    gone = store.add(image(), settings(2), owner="browser:a")
    os.remove(gone.path)
    assert [e.id for e in store.list("browser:a").entries] == [kept.id]


def test_concurrent_writers(tmp_path):
    store = GalleryStore(tmp_path).open()
    errors = []

    def write(owner: str) -> None:
        try:
            for i in range(10):
                store.add(image(), settings(i), owner=owner)
        except Exception as exc:  # collected for the assert below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(f"browser:{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.count() == 40
    assert len(list(store.images_dir.rglob("*.png"))) == 40


def test_as_json_fields(tmp_path):
    store = GalleryStore(tmp_path).open()
    entry = store.add(image(), settings(7), owner="browser:a")
    data = entry.as_json()
    assert set(data) == {"id", "prompt", "seed", "settings", "created", "image"}
    assert json.dumps(data)
