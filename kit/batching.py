"""Dynamic batching: jobs waiting for the same model that can share a pipeline call run as one.

Gradio lets several generate jobs in at once; each one lands here. A dispatcher thread waits
for a free model replica, then takes the oldest pending job together with every compatible
job that arrived meanwhile (same mode, size, steps, guidance and strength), up to the
preset's ``max_batch_size``. Under light load a job never waits for company: it runs as soon
as a replica is free. Under heavy load, jobs that queued behind a running batch form the
next one, so the GPU works on many visitors' images per call. With the automatic window, a
free replica that has just run a batch of several jobs waits a moment for those visitors'
next jobs, which arrive a few at a time as the results reach them. Without the window, the
first to arrive would run alone and the rest would wait behind it.

The window waits for as many jobs as the site had in play when the last call ended: the
call's own jobs, whose visitors may come back, and the jobs that waited behind it. Waiting
for the call's size alone would settle on a batch smaller than the number of visitors, with
the rest always one call behind. Once those jobs are in, and on a quiet site that receives
several jobs at once, the window stays open while more keep arriving close together, so a
burst of visitors shares one call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# The automatic window: this share of the last call's duration, at most AUTO_WINDOW_MAX
# seconds. It ends early once the expected compatible jobs wait and no more are arriving.
AUTO_WINDOW_FRACTION = 0.5
AUTO_WINDOW_MAX = 0.5
# Once the expected jobs are in, the automatic window stays open while each further
# compatible job arrives within this many seconds of the one before.
ARRIVAL_GAP_SECONDS = 0.02
# On a quiet site, the most a burst of several jobs waits for more of its jobs (seconds).
BURST_WAIT_MAX = 0.1


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
        window_seconds: float | None = 0.0,
    ):
        """``window_seconds=None`` selects the automatic window (see the module docstring)."""
        self._run_batch = run_batch
        self._slots = threading.BoundedSemaphore(max(1, slots))
        self.max_batch_size = max(1, max_batch_size)
        self.max_images = max(1, max_images)
        self.window_seconds = window_seconds
        # Size and duration of the last call, and the jobs pending when it ended, for the
        # automatic window.
        self._last_jobs = 0
        self._last_seconds = 0.0
        self._pending_after_last = 0
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
            window = self.current_window()
            if window > 0 and self.max_batch_size > 1:
                deadline = time.monotonic() + window
                # The automatic window expects the last call's visitors back, not a full batch,
                # so a site with fewer visitors than max_batch_size does not wait out every window.
                target = self.max_batch_size
                if self.window_seconds is None:
                    target = min(self.max_batch_size, self._last_jobs + self._pending_after_last)
                while not self._batch_full(self._compatible(), target):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._condition.wait(remaining)
                if self.window_seconds is None:
                    self._wait_while_arriving(deadline)
                self._drop_cancelled()
                if not self._pending:
                    return []
            elif self.window_seconds is None and self.max_batch_size > 1 and len(self._compatible()) > 1:
                # A quiet site that receives several jobs at once: a burst is arriving.
                self._wait_while_arriving(time.monotonic() + BURST_WAIT_MAX)
            batch = self._compatible()
            for job in batch:
                self._pending.remove(job)
                job.on_cancel = None
            return batch

    def _wait_while_arriving(self, deadline: float) -> None:
        """Keep the window open while compatible jobs still arrive close together.

        The expected count comes from the last call, so after a quiet spell it can be low
        while a burst of visitors is arriving. Without this wait the burst would split into a
        small call now and the rest one call later. Called with the condition held.
        """
        while len(self._compatible()) < self.max_batch_size:
            count = len(self._compatible())
            quiet_until = min(deadline, time.monotonic() + ARRIVAL_GAP_SECONDS)
            while len(self._compatible()) == count:
                remaining = quiet_until - time.monotonic()
                if remaining <= 0:
                    return
                self._condition.wait(remaining)

    def current_window(self) -> float:
        """Seconds a free replica waits for more compatible jobs before it starts a call."""
        if self.window_seconds is not None:
            return self.window_seconds
        if self._last_jobs < 2:
            return 0.0
        return min(AUTO_WINDOW_MAX, AUTO_WINDOW_FRACTION * self._last_seconds)

    def _batch_full(self, batch: list[Any], target: int) -> bool:
        images = sum(job.request.num_images for job in batch)
        return len(batch) >= target or images >= self.max_images

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
        started = time.monotonic()
        try:
            if len(batch) > 1:
                logger.debug("running a batch of %d jobs", len(batch))
            self._run_batch(batch)
        finally:
            with self._condition:
                self._last_jobs = len(batch)
                self._last_seconds = time.monotonic() - started
                self._pending_after_last = len(self._pending)
            self._slots.release()
