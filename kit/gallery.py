"""The gallery: PNG files under the data folder, indexed in SQLite.

Each finished image is written under a temporary name, flushed, renamed into
``images/YYYY/MM/`` and only then indexed, so a crash can leave a file without a row
(harmless, and swept at start) but never a row without its file. The PNG carries its
settings in a ``parameters`` text chunk, so a downloaded image still says how it was made.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from kit.errors import GalleryError

logger = logging.getLogger(__name__)

SHARED_OWNER = "*"  # the owner filter that matches every entry, for a shared gallery
_TEMP_PREFIX = ".tmp-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    path TEXT NOT NULL,
    prompt TEXT NOT NULL,
    negative_prompt TEXT NOT NULL DEFAULT '',
    seed INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    guidance_scale REAL NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    strength REAL,
    mode TEXT NOT NULL,
    model TEXT NOT NULL,
    scheduler TEXT NOT NULL DEFAULT '',
    kit_version TEXT NOT NULL,
    parameters TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_owner_created ON entries (owner, created_at DESC);
CREATE INDEX IF NOT EXISTS entries_created ON entries (created_at DESC);
"""


@dataclass(frozen=True)
class GalleryEntry:
    id: str
    owner: str
    created_at: float
    path: Path  # absolute path of the PNG
    parameters: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt": self.parameters.get("prompt", ""),
            "seed": self.parameters.get("seed"),
            "settings": self.parameters,
            "created": datetime.fromtimestamp(self.created_at, tz=timezone.utc).isoformat(timespec="seconds"),
            "image": str(self.path),
        }


@dataclass(frozen=True)
class GalleryPage:
    entries: list[GalleryEntry]
    page: int
    page_size: int
    total: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page_size))


ImageWriter = Callable[[Any, BinaryIO, str], None]
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def write_png(image: Any, handle: BinaryIO, parameters_json: str) -> None:
    """Write ``image`` as PNG with its settings in a ``parameters`` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters_json)
    image.save(handle, format="PNG", pnginfo=info)


def _write_failure(exc: OSError) -> str:
    if exc.errno in _DISK_FULL:
        logger.error("gallery write failed, the disk is full: %s", exc)
        return "the server's disk is full, so the image could not be saved to the gallery and nothing was kept. Try again later."
    logger.error("gallery write failed: %s", exc)
    return f"could not save the image to the gallery: {exc.strerror or exc}"


class GalleryStore:
    """SQLite index plus image files, scoped by owner. Safe to share between threads."""

    def __init__(self, data_dir: Path, *, clock: Any = time.time, write_image: ImageWriter | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.images_dir = self.data_dir / "images"
        self.db_path = self.data_dir / "gallery.sqlite3"
        self._clock = clock
        # Seam for tests that need a failing disk (for example OSError(ENOSPC)).
        self.write_image = write_image or write_png
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._opened = False

    # -- connection -------------------------------------------------------------------------

    def open(self) -> GalleryStore:
        """Create the folders and the schema, and sweep temporary files left by a crash."""
        self.images_dir.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.executescript(_SCHEMA)
        swept = 0
        for leftover in self.images_dir.rglob(f"{_TEMP_PREFIX}*"):
            leftover.unlink(missing_ok=True)
            swept += 1
        if swept:
            logger.info("removed %d unfinished image file(s) from an earlier run", swept)
        self._opened = True
        return self

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    def _ensure_open(self) -> None:
        if not self._opened:
            self.open()

    # -- writing ----------------------------------------------------------------------------

    def add(self, image: Any, parameters: dict[str, Any], owner: str) -> GalleryEntry:
        """Save one PIL image with its settings and index it; return the new entry."""
        return self.add_many([(image, parameters)], owner)[0]

    def add_many(self, items: list[tuple[Any, dict[str, Any]]], owner: str) -> list[GalleryEntry]:
        """Save the images of one job and index them all, or save none of them.

        Every file is written and renamed into place first; the rows then go in one
        transaction. On any failure the files written so far are deleted and GalleryError is
        raised, so a job never leaves part of its images, a row without a file, or a temporary
        file behind.
        """
        self._ensure_open()
        if not items:
            return []
        written: list[tuple[GalleryEntry, tuple[Any, ...]]] = []
        try:
            for image, parameters in items:
                written.append(self._write_file(image, parameters, owner))
        except BaseException as exc:
            for entry, _row in written:
                entry.path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise GalleryError(_write_failure(exc)) from exc
            raise

        rows = [row for _entry, row in written]
        try:
            with self._write_lock:
                conn = self._connect()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(f"INSERT INTO entries VALUES ({', '.join('?' * len(rows[0]))})", rows)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            for entry, _row in written:
                entry.path.unlink(missing_ok=True)
            logger.error("could not index %d gallery image(s): %s", len(rows), exc)
            raise GalleryError(f"could not index the image in the gallery: {exc}") from exc
        return [entry for entry, _row in written]

    def _write_file(self, image: Any, parameters: dict[str, Any], owner: str) -> tuple[GalleryEntry, tuple[Any, ...]]:
        """Write one image under a temporary name, flush it, rename it into place; return entry and row."""
        entry_id = uuid.uuid4().hex
        created = self._clock()
        stamp = datetime.fromtimestamp(created, tz=timezone.utc)
        folder = self.images_dir / f"{stamp:%Y}" / f"{stamp:%m}"
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{stamp:%Y%m%d-%H%M%S}-{entry_id[:12]}.png"
        temporary = folder / f"{_TEMP_PREFIX}{entry_id}.png"

        row = (
            entry_id,
            owner,
            created,
            str(final.relative_to(self.images_dir)),
            parameters.get("prompt", ""),
            parameters.get("negative_prompt", "") or "",
            int(parameters["seed"]),
            int(parameters["steps"]),
            float(parameters["guidance_scale"]),
            int(parameters["width"]),
            int(parameters["height"]),
            parameters.get("strength"),
            parameters.get("mode", "text2image"),
            parameters.get("model", ""),
            parameters.get("scheduler", ""),
            parameters.get("kit_version", ""),
            json.dumps(parameters, sort_keys=True),
        )
        try:
            with open(temporary, "wb") as handle:
                self.write_image(image, handle, json.dumps(parameters, sort_keys=True))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return GalleryEntry(entry_id, owner, created, final, parameters), row

    def delete(self, entry_id: str, owner: str) -> None:
        """Delete an entry that ``owner`` made: the row first, then its file."""
        self._ensure_open()
        with self._write_lock:
            conn = self._connect()
            row = conn.execute("SELECT owner, path FROM entries WHERE id = ?", (entry_id,)).fetchone()
            if row is None:
                raise GalleryError(f"gallery entry {entry_id} not found")
            if row["owner"] != owner:
                raise GalleryError("only the visitor who made this image can delete it")
            conn.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
        (self.images_dir / row["path"]).unlink(missing_ok=True)
        logger.info("deleted gallery entry %s", entry_id)

    # -- reading ----------------------------------------------------------------------------

    def _entry(self, row: sqlite3.Row) -> GalleryEntry:
        return GalleryEntry(
            id=row["id"],
            owner=row["owner"],
            created_at=row["created_at"],
            path=self.images_dir / row["path"],
            parameters=json.loads(row["parameters"]),
        )

    def get(self, entry_id: str, owner: str) -> GalleryEntry:
        self._ensure_open()
        row = self._connect().execute("SELECT * FROM entries WHERE id = ?", (entry_id,)).fetchone()
        if row is None or (owner != SHARED_OWNER and row["owner"] != owner):
            raise GalleryError(f"gallery entry {entry_id} not found")
        return self._entry(row)

    def list(self, owner: str, page: int = 1, page_size: int = 24) -> GalleryPage:
        """Return one page of ``owner``'s entries, newest first; ``SHARED_OWNER`` lists all.

        Entries whose file has gone missing are left out rather than shown broken.
        """
        self._ensure_open()
        if page < 1:
            raise GalleryError(f"page must be 1 or more, got {page}")
        conn = self._connect()
        where, args = ("", ()) if owner == SHARED_OWNER else ("WHERE owner = ?", (owner,))
        total = conn.execute(f"SELECT COUNT(*) FROM entries {where}", args).fetchone()[0]
        rows = conn.execute(
            f"SELECT * FROM entries {where} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
            (*args, page_size, (page - 1) * page_size),
        ).fetchall()
        entries = [self._entry(row) for row in rows]
        present = [e for e in entries if e.path.is_file()]
        if len(present) != len(entries):
            logger.warning("%d gallery entries point at missing files", len(entries) - len(present))
        return GalleryPage(present, page, page_size, total)

    def count(self) -> int:
        self._ensure_open()
        return self._connect().execute("SELECT COUNT(*) FROM entries").fetchone()[0]


def read_png_parameters(path: str | Path) -> dict[str, Any] | None:
    """Return the settings stored in a gallery PNG, or None when it carries none."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get("parameters") if image.format == "PNG" else None
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
