"""Per-identity job limits, the sign-in attempt limit and the prompt blocklist.

No Gradio here: callers pass the identity and the number of jobs that identity already has
in the queue (see ``kit.security.guard.queued_jobs``).
"""

from __future__ import annotations

import math
import re
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable

from kit.errors import InvalidRequest

WINDOW_SECONDS = 60.0
# Identities idle for longer than the window are forgotten; this bounds memory under many addresses.
_SWEEP_EVERY = 1024


def identity_for(username: str | None, client_host: str | None) -> str:
    """Return the key that limits count against: the signed-in user, else the client address.

    An API token counts as the user it belongs to. Behind a reverse proxy the client address
    is the one the proxy reports in X-Forwarded-For (uvicorn trusts it from 127.0.0.1 only).
    """
    if username:
        return f"user:{username}"
    return f"address:{client_host or 'unknown'}"


class SlidingWindow:
    """Counts events per key over the last ``WINDOW_SECONDS``. Safe to share between threads."""

    def __init__(self, limit: int, *, clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self._clock = clock
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._calls = 0

    def _recent(self, key: str, now: float) -> deque[float]:
        events = self._events.setdefault(key, deque())
        while events and events[0] <= now - WINDOW_SECONDS:
            events.popleft()
        return events

    def _sweep(self, now: float) -> None:
        self._calls += 1
        if self._calls % _SWEEP_EVERY:
            return
        for key in [k for k, events in self._events.items() if not events or events[-1] <= now - WINDOW_SECONDS]:
            del self._events[key]

    def retry_after(self, key: str) -> float:
        """Return the seconds until ``key`` may act again; 0 when it may act now."""
        if self.limit <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            events = self._recent(key, now)
            if len(events) < self.limit:
                return 0.0
            return events[len(events) - self.limit] + WINDOW_SECONDS - now

    def record(self, key: str) -> None:
        if self.limit <= 0:
            return
        with self._lock:
            now = self._clock()
            self._recent(key, now).append(now)
            self._sweep(now)

    def try_acquire(self, key: str) -> float:
        """Record one event for ``key`` unless it is over the limit; return the wait (0 = recorded)."""
        if self.limit <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            events = self._recent(key, now)
            if len(events) >= self.limit:
                return events[len(events) - self.limit] + WINDOW_SECONDS - now
            events.append(now)
            self._sweep(now)
            return 0.0


class JobLimiter:
    """Admits a job for an identity, or raises InvalidRequest saying when to try again."""

    def __init__(self, jobs_per_minute: int, max_queued: int, *, clock: Callable[[], float] = time.monotonic):
        self.jobs_per_minute = jobs_per_minute
        self.max_queued = max_queued
        self._window = SlidingWindow(jobs_per_minute, clock=clock)

    @property
    def enabled(self) -> bool:
        return self.jobs_per_minute > 0 or self.max_queued > 0

    def admit(self, identity: str, queued: int, parameter: str = "prompt") -> None:
        """Count one job for ``identity``, which already has ``queued`` jobs waiting or running."""
        if self.max_queued and queued >= self.max_queued:
            raise InvalidRequest(
                parameter,
                f"Too many jobs at once: {self.max_queued} queued or running per visitor on this site. "
                "Wait for one to finish, then try again.",
            )
        wait = self._window.try_acquire(identity)
        if wait > 0:
            raise InvalidRequest(
                parameter,
                f"Too many jobs: {self.jobs_per_minute} per minute on this site. Try again in {math.ceil(wait)} s.",
            )


def _normalise(text: str) -> str:
    # NFKC folds look-alike forms (fullwidth letters, ligatures); casefold is a stronger lower().
    return unicodedata.normalize("NFKC", text).casefold()


class TermBlocklist:
    """Rejects prompts that contain a blocked word or phrase: whole words, any case."""

    MESSAGE = "This prompt contains wording that is not allowed on this site. Change the prompt and try again."

    def __init__(self, terms: Iterable[str]):
        patterns = []
        for term in terms:
            words = _normalise(term).split()
            if words:
                patterns.append(r"\s+".join(re.escape(word) for word in words))
        self._pattern = re.compile(r"(?<!\w)(?:" + "|".join(patterns) + r")(?!\w)") if patterns else None

    @property
    def enabled(self) -> bool:
        return self._pattern is not None

    def matches(self, text: str) -> bool:
        return self._pattern is not None and self._pattern.search(_normalise(text)) is not None

    def check(self, text: str, parameter: str = "prompt") -> None:
        """Raise InvalidRequest with a neutral message (it does not name the term) on a match."""
        if self.matches(text):
            raise InvalidRequest(parameter, self.MESSAGE)
