"""Cancel hooks: stop a running job the moment its cancel request reaches the server.

Gradio handles a cancel (the Stop button, ``Job.cancel()`` in gradio_client) by closing the
event's generator handler, which it can do only while the handler waits at a ``yield``. A
handler that yields a few times a second would let a fast pipeline run many more steps
before it noticed. So each generate handler registers its job's ``cancel`` here under
Gradio's session hash and event id, and the kit's middleware calls it as soon as it reads a
cancel request, before Gradio routes it. The generator is still closed as usual afterwards.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

Key = tuple[str, str]


class CancelHooks:
    """Thread-safe map from (session hash, event id) to the running job's cancel function."""

    def __init__(self) -> None:
        self._hooks: dict[Key, Callable[[], None]] = {}
        self._lock = threading.Lock()

    def register(self, session_hash: str | None, event_id: str | None, cancel: Callable[[], None]) -> Callable[[], None]:
        """Add a hook; return the function that removes it. Without both ids nothing is added."""
        if not session_hash or not event_id:
            return lambda: None
        key = (session_hash, event_id)
        with self._lock:
            self._hooks[key] = cancel

        def remove() -> None:
            with self._lock:
                if self._hooks.get(key) is cancel:
                    del self._hooks[key]

        return remove

    def cancel(self, session_hash: str, event_id: str) -> bool:
        """Run and remove the hook for this event; return whether there was one.

        Both ids must match, as Gradio's own cancel route requires, so knowing an event id
        alone does not let one visitor stop another's job.
        """
        with self._lock:
            hook = self._hooks.pop((session_hash, event_id), None)
        if hook is None:
            return False
        try:
            hook()
        except Exception:  # a failing hook must not break the cancel request itself
            logger.exception("cancel hook failed")
        return True

    def cancel_session(self, session_hash: str) -> int:
        """Run and remove every hook of one session, and return how many ran.

        For a visitor whose event stream dropped: Gradio drops that session's events too,
        but stops a running handler only at its next yield.
        """
        with self._lock:
            keys = [key for key in self._hooks if key[0] == session_hash]
            hooks = [self._hooks.pop(key) for key in keys]
        for hook in hooks:
            try:
                hook()
            except Exception:  # one failing hook must not keep the others from running
                logger.exception("cancel hook failed for session %s", session_hash[:12])
        return len(hooks)

    def __len__(self) -> int:
        with self._lock:
            return len(self._hooks)
