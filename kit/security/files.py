"""File policy: the folders the site serves, and the age limit of Gradio's temporary files.

The site serves the gallery images folder and Gradio's own temporary folder, nothing else.

Gradio's file route already checks ``allowed_paths``; this check runs before it, in the kit's
middleware, so that a Gradio change cannot widen what is served. It rejects URLs (Gradio would
fetch them itself), ``..`` in any encoding, NUL bytes, and any path whose real location
(after following symlinks) is outside the served folders.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

logger = logging.getLogger(__name__)

# Gradio 6 serves files at /gradio_api/file=PATH and, for old clients, /gradio_api/file/PATH.
FILE_ROUTE = re.compile(r"^/gradio_api/file(?:=|/)(?P<path>.*)$", re.DOTALL)
_MAX_DECODE_ROUNDS = 4


def _decodings(text: str) -> list[str]:
    """Return ``text`` and its percent-decodings until decoding changes nothing."""
    forms = [text]
    for _ in range(_MAX_DECODE_ROUNDS):
        decoded = unquote(forms[-1])
        if decoded == forms[-1]:
            break
        forms.append(decoded)
    return forms


def file_request_problem(requested: str, raw_requested: str, served_roots: Iterable[Path]) -> str | None:
    """Return why a file request must be rejected, or None when it names a file in a served folder.

    ``requested`` is the path as the server decoded it once. ``raw_requested`` is the same part
    of the URL as sent, which is checked too because it shows encoded and double-encoded ``..``.
    """
    for form in (*_decodings(requested), *_decodings(raw_requested)):
        if "\x00" in form:
            return "the path contains a NUL byte"
        if "://" in form or form.lower().startswith(("http:", "https:", "data:")):
            return "URLs are not served"
        if ".." in re.split(r"[/\\]", form):
            return "the path contains '..'"
    if not os.path.isabs(requested):
        return "the path is not absolute"
    real = Path(os.path.realpath(requested))
    for root in served_roots:
        root_real = Path(os.path.realpath(root))
        if real == root_real or root_real in real.parents:
            return None if real.is_file() else "the file does not exist"
    return "the file is outside the served folders"


def sweep_old_files(folder: Path, max_age_seconds: float, now: float | None = None) -> int:
    """Delete files (and then empty folders) under ``folder`` not modified for ``max_age_seconds``.

    Returns the number of files deleted. Files that vanish meanwhile are skipped.
    """
    now = time.time() if now is None else now
    cutoff = now - max_age_seconds
    deleted = 0
    # Bottom-up, so a folder is visited after everything in it and can be removed once empty.
    for current, _folders, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(current, name)
            try:
                info = os.lstat(path)
                # ctime too: a file renamed into place keeps an old mtime but is new here.
                if max(info.st_mtime, info.st_ctime) < cutoff:
                    os.unlink(path)
                    deleted += 1
            except FileNotFoundError:
                continue
        if os.path.abspath(current) != os.path.abspath(folder):
            with contextlib.suppress(OSError):  # not empty, or already gone
                os.rmdir(current)
    return deleted


def temp_cleanup_lifespan(max_age_seconds: int) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """Return a Starlette lifespan that bounds Gradio's temporary folder by file age.

    Gradio's own ``delete_cache`` only deletes the files its components made, so uploads that
    no event ever used would stay until a restart. This sweeps the whole folder instead, at
    start and then every ``min(max_age_seconds, 300)`` seconds, but only when GRADIO_TEMP_DIR
    names it: the default folder under /tmp may be shared with other Gradio apps.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        folder = os.environ.get("GRADIO_TEMP_DIR")
        if not folder:
            logger.warning("GRADIO_TEMP_DIR is not set, so the kit does not bound Gradio's temporary files")
            yield
            return
        interval = min(max_age_seconds, 300)

        async def sweep_forever() -> None:
            while True:
                try:
                    deleted = await asyncio.to_thread(sweep_old_files, Path(folder), max_age_seconds)
                except OSError as exc:
                    logger.warning("sweeping the temporary folder %s failed: %s", folder, exc)
                else:
                    if deleted:
                        logger.info("deleted %d temporary file(s) older than %d s from %s", deleted, max_age_seconds, folder)
                await asyncio.sleep(interval)

        task = asyncio.create_task(sweep_forever())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return lifespan
