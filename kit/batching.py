"""Dynamic batching: jobs waiting for the same model that can share a pipeline call run as one.

Gradio lets several generate jobs in at once; each one lands here. A dispatcher thread waits
for a free model replica, then takes the oldest pending job together with every compatible
job that arrived meanwhile (same mode, size, steps, guidance and strength), up to the
preset's ``max_batch_size``. Under light load a job never waits for company: it runs as soon
as a replica is free. Under heavy load, jobs that queued behind a running batch form the
next one, so the GPU works on many visitors' images per call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


def batch_key(request: Any) -> tuple[Any, ...]:
    """Return what two requests must share to run in one pipeline call."""
    return (
        request.mode,
        request.width,
        request.height,
        request.steps,
        request.guidance_scale,
        request.strength if request.init_image is not None else None,
    )


class AllCancelled:
    """A stop flag for a batch: set once every job in it has been cancelled."""

    def __init__(self, jobs: list[Any]):
        self.jobs = jobs

    def is_set(self) -> bool:
        return all(job.cancelled.is_set() for job in self.jobs)


class BatchCollector:
    """Groups pending jobs into batches and runs each batch on a free replica slot."""

    def __init__(
        self,
        run_batch: Callable[[list[Any]], None],
        *,
        slots: int,
        max_batch_size: int,
        max_images: int,
        window_seconds: float = 0.0,
    ):
        self._run_batch = run_batch
        self._slots = threading.BoundedSemaphore(max(1, slots))
        self.max_batch_size = max(1, max_batch_size)
        self.max_images = max(1, max_images)
        self.window_seconds = window_seconds
        self._pending: list[Any] = []
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def submit(self, job: Any) -> None:
        job.on_cancel = self._cancel_pending
        with self._condition:
            self._pending.append(job)
            self._ensure_thread()
            self._condition.notify_all()

    def _cancel_pending(self, job: Any) -> None:
        with self._condition:
            if job not in self._pending:
                return  # already running: the step callback sees the flag
            self._pending.remove(job)
        job.finish_cancelled()

    def pending_count(self) -> int:
        with self._condition:
            return len(self._pending)

    def close(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()

    def _ensure_thread(self) -> None:
        # Started on the first job, not in __init__, so building the app starts no threads.
        if self._thread is None:
            self._thread = threading.Thread(target=self._dispatch, name="kit-batch-dispatch", daemon=True)
            self._thread.start()

    def _dispatch(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return
            self._slots.acquire()
            batch = self._take_batch()
            if not batch:
                self._slots.release()
                continue
            threading.Thread(target=self._run, args=(batch,), name="kit-generate", daemon=True).start()

    def _take_batch(self) -> list[Any]:
        with self._condition:
            self._drop_cancelled()
            if not self._pending:
                return []
            if self.window_seconds > 0 and self.max_batch_size > 1:
                deadline = time.monotonic() + self.window_seconds
                while len(self._compatible()) < self.max_batch_size:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._condition.wait(remaining)
                self._drop_cancelled()
                if not self._pending:
                    return []
            batch = self._compatible()
            for job in batch:
                self._pending.remove(job)
                job.on_cancel = None
            return batch

    def _compatible(self) -> list[Any]:
        first = self._pending[0]
        key = batch_key(first.request)
        batch = [first]
        images = first.request.num_images
        for job in self._pending[1:]:
            if len(batch) >= self.max_batch_size:
                break
            if batch_key(job.request) != key or images + job.request.num_images > self.max_images:
                continue
            batch.append(job)
            images += job.request.num_images
        return batch

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._pending if j.cancelled.is_set()]:
            self._pending.remove(job)
            job.finish_cancelled()

    def _run(self, batch: list[Any]) -> None:
        try:
            if len(batch) > 1:
                logger.debug("running a batch of %d jobs", len(batch))
            self._run_batch(batch)
        finally:
            self._slots.release()
