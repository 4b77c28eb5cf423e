"""Helpers shared by the UI modules: visitor identity and error translation."""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from collections.abc import Iterator

import gradio as gr

from kit.errors import JobCancelled, KitError

logger = logging.getLogger(__name__)

# Every event that touches a model shares this concurrency group, so the queue never runs
# more model jobs at once than there are replicas to run them.
MODEL_CONCURRENCY_ID = "models"
_BROWSER_ID = re.compile(r"^[0-9a-f]{32}$")


def new_browser_id(current: str | None) -> str:
    """Keep a valid anonymous id from the browser's storage, or make a new one."""
    if isinstance(current, str) and _BROWSER_ID.match(current):
        return current
    return uuid.uuid4().hex


def owner_for(request: gr.Request | None, browser_id: str | None) -> str:
    """Return whose gallery a request belongs to.

    A signed-in user is keyed by user name. An anonymous browser is keyed by the random id
    kept in its local storage. A script without either is keyed by its client session, so
    one gradio_client ``Client`` sees the images it made.
    """
    if request is not None and getattr(request, "username", None):
        return f"user:{request.username}"
    if isinstance(browser_id, str) and _BROWSER_ID.match(browser_id):
        return f"browser:{browser_id}"
    session = getattr(request, "session_hash", None) if request is not None else None
    if session:
        return f"session:{session}"
    return "anonymous"


@contextlib.contextmanager
def visitor_errors() -> Iterator[None]:
    """Turn kit errors into ``gr.Error`` for the visitor; log anything else with its traceback."""
    try:
        yield
    except gr.Error:
        raise
    except JobCancelled:
        raise gr.Error("Stopped.", print_exception=False) from None
    except KitError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    except Exception:
        logger.exception("request failed")
        raise gr.Error("Something went wrong on the server. The error was logged; please try again.") from None
