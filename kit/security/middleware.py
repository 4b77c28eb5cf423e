"""The kit's ASGI middleware: health check, access control, file route policy, input gate.

It runs inside Gradio's own middleware, on every request to the site, before routing:

1. ``GET /healthz`` gets its response here, always: ``{"status": "ok"}`` and nothing else.
2. With access control on, a request needs a Gradio session cookie (from the sign-in form)
   or ``Authorization: Bearer TOKEN``. Without either, only the sign-in page (``GET /``),
   ``POST /login``, ``/logout`` and ``/gradio_api/startup-events`` respond. Every other route
   returns 401, whether Gradio checks it or not (in Gradio 6.31 the heartbeat, cancel, stream,
   token and user routes, the static assets, and anything mounted on the app do not check).
   Gradio's own page at ``/`` is replaced for signed-out callers because it embeds the API
   description.
3. File requests (``/gradio_api/file=...``) must name a file inside the served folders.
4. Job requests have their image inputs checked and URLs fetched (``kit.security.gate``).
5. A cancel request (``POST /gradio_api/cancel``) stops its job here at once, through the
   job's cancel hook (``kit.cancels``), and then goes on to Gradio as usual.
6. A session's event stream (``GET /gradio_api/queue/data``) that the client drops before
   Gradio ends it stops that session's running jobs the same way.

An API token's user reaches ``gr.Request.username`` through a FastAPI dependency override
of Gradio's ``get_current_user``, installed on the first request.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse

from kit.cancels import CancelHooks
from kit.errors import InvalidRequest
from kit.security.files import FILE_ROUTE, file_request_problem
from kit.security.gate import JOB_ROUTE, InputGate, validation_detail
from kit.security.guard import SiteGuard

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HEALTH_PATH = "/healthz"
LOGIN_PATHS = frozenset({"/login", "/login/"})
# Open without signing in. Gradio's launch() itself calls startup-events (without credentials)
# to run the app's start-up events once; the route returns only true or false.
PUBLIC_PATHS = LOGIN_PATHS | {"/logout", "/logout/", "/gradio_api/startup-events"}
# The scope key where the middleware leaves the user name of a valid API token.
TOKEN_USER_KEY = "kit.token_user"
_GRADIO_USER_FUNCTION = "get_current_user"
# Bytes of JSON allowed per job request on top of the upload limit (base64 adds a third).
_BODY_MARGIN = 1_000_000
CANCEL_PATH = "/gradio_api/cancel"
# The event stream of a session: a client that drops it mid-job has left.
STREAM_PATH = "/gradio_api/queue/data"
# A cancel body contains a session hash, an event id and a number.
_CANCEL_BODY_LIMIT = 16_384

LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in · {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; display: flex; min-height: 100vh; margin: 0; align-items: center; justify-content: center; background: #f6f7f9; }}
form {{ background: #fff; padding: 2rem; border-radius: 12px; box-shadow: 0 2px 12px rgba(0,0,0,.08); width: min(22rem, 90vw); }}
h1 {{ font-size: 1.3rem; margin: 0 0 1.2rem; }}
label {{ display: block; margin: .8rem 0 .3rem; font-size: .9rem; }}
input {{ width: 100%; box-sizing: border-box; padding: .55rem; border: 1px solid #ccd; border-radius: 6px; font-size: 1rem; }}
button {{ margin-top: 1.2rem; width: 100%; padding: .6rem; border: 0; border-radius: 6px; background: #4f46e5; color: #fff; font-size: 1rem; cursor: pointer; }}
#message {{ color: #b91c1c; min-height: 1.2em; margin-top: .8rem; font-size: .9rem; }}
</style></head>
<body><form id="login" method="post" action="login">
<h1>{title}</h1>
<label for="username">User name</label><input id="username" name="username" autocomplete="username" required autofocus>
<label for="password">Password</label><input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">Sign in</button><div id="message" role="alert"></div>
</form>
<script>
const form = document.getElementById("login");
form.addEventListener("submit", async (event) => {{
  event.preventDefault();
  const response = await fetch("login", {{ method: "POST", body: new URLSearchParams(new FormData(form)) }});
  if (response.ok) {{ window.location.reload(); return; }}
  const message = document.getElementById("message");
  if (response.status === 429) {{ message.textContent = (await response.json()).detail; }}
  else {{ message.textContent = "Incorrect user name or password."; }}
}});
</script></body></html>
"""


def _site_path(scope: Scope) -> str:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def _raw_site_path(scope: Scope) -> str:
    raw = scope.get("raw_path")
    text = raw.decode("latin-1") if isinstance(raw, bytes | bytearray) else scope.get("path", "")
    return text.split("?", 1)[0]


def _bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""  # an Authorization header that is not a bearer token
    return None


def _client_host(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class SiteGuardMiddleware:
    """Pure ASGI middleware (so streamed responses such as SSE pass through untouched)."""

    def __init__(self, app: Callable[..., Awaitable[None]], guard: SiteGuard, cancel_hooks: CancelHooks | None = None):
        self.app = app
        self.guard = guard
        self.cancel_hooks = cancel_hooks
        self._gradio_user_function: Callable[..., Awaitable[str | None]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = _site_path(scope)
        method = scope.get("method", "GET")

        if path == HEALTH_PATH and method in ("GET", "HEAD"):
            await JSONResponse({"status": "ok"})(scope, receive, send)
            return

        if self.guard.access_control:
            allowed = await self._authenticate(scope, receive, send, path, method)
            if not allowed:
                return
            if path in LOGIN_PATHS and method == "POST":
                await self._login(scope, receive, send)
                return

        # After the sign-in check, so that a signed-out caller cannot probe which files exist.
        file_match = FILE_ROUTE.match(path)
        if file_match is not None:
            problem = self._file_problem(scope, file_match.group("path"))
            if problem is not None:
                logger.info("rejected a file request from %s: %s", _client_host(scope), problem)
                await self._deny(scope, receive, send, 403, "File not allowed.")
                return

        if method == "POST" and JOB_ROUTE.match(path):
            await self._gate(scope, receive, send, path)
            return
        if method == "POST" and path == CANCEL_PATH and self.cancel_hooks is not None:
            await self._cancel(scope, receive, send)
            return
        if method == "GET" and path == STREAM_PATH and self.cancel_hooks is not None:
            await self._watch_stream(scope, receive, send)
            return
        await self.app(scope, receive, send)

    # -- access control -------------------------------------------------------------------

    async def _authenticate(self, scope: Scope, receive: Receive, send: Send, path: str, method: str) -> bool:
        """Return True when the request may go on; otherwise send the response here and return False."""
        app = scope.get("app")
        self._install_user_override(app)
        token = _bearer_token(scope)
        if token:
            user = self.guard.credentials.user_for_token(token)
            if user is None:
                await self._deny(scope, receive, send, 401, "Invalid API token.")
                return False
            scope[TOKEN_USER_KEY] = user
            return True
        if await self._session_user(scope) is not None:
            return True
        if path in PUBLIC_PATHS:
            return True
        if path == "/" and method in ("GET", "HEAD") and scope["type"] == "http":
            page = LOGIN_PAGE.format(title=html.escape(self.guard.site_title))
            await HTMLResponse(page, headers={"Cache-Control": "no-store"})(scope, receive, send)
            return False
        await self._deny(scope, receive, send, 401, "Not authenticated. Sign in, or send Authorization: Bearer TOKEN.")
        return False

    async def _session_user(self, scope: Scope) -> str | None:
        if self._gradio_user_function is None or scope["type"] != "http":
            return _cookie_user(scope)
        return await self._gradio_user_function(Request(scope))

    def _install_user_override(self, app: Any) -> None:
        """Make Gradio's get_current_user see API token users, so gr.Request.username is set."""
        if self._gradio_user_function is not None or app is None:
            return
        original = _find_gradio_user_function(getattr(getattr(app, "router", None), "routes", []))
        if original is None:
            logger.warning("Gradio's get_current_user was not found; API token users will have no user name")
            return

        async def current_user(request: Request) -> str | None:
            token_user = request.scope.get(TOKEN_USER_KEY)
            if token_user:
                return token_user
            return await original(request)

        app.dependency_overrides[original] = current_user
        self._gradio_user_function = original

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass a sign-in to Gradio, counting failures per client address."""
        client = _client_host(scope)
        wait = self.guard.login_failures.retry_after(client)
        if wait > 0:
            logger.warning("sign-in attempts from %s are over the limit", client)
            response = JSONResponse(
                {"detail": f"Too many failed sign-ins. Try again in {math.ceil(wait)} s."},
                status_code=429,
                headers={"Retry-After": str(math.ceil(wait))},
            )
            await response(scope, receive, send)
            return
        status: list[int] = []

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, receive, watch)
        if status and status[0] in (400, 401):
            self.guard.login_failures.record(client)
            logger.info("failed sign-in from %s", client)

    # -- files --------------------------------------------------------------------------------

    def _file_problem(self, scope: Scope, requested: str) -> str | None:
        raw_match = FILE_ROUTE.match(_raw_site_path(scope))
        raw_requested = raw_match.group("path") if raw_match else requested
        roots = [self.guard.images_dir]
        upload_dir = getattr(scope.get("app"), "uploaded_file_dir", None)
        if upload_dir:
            roots.append(upload_dir)
        return file_request_problem(requested, raw_requested, roots)

    # -- job bodies ---------------------------------------------------------------------------

    async def _gate(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        limit = self.guard.max_upload_bytes * 4 // 3 + _BODY_MARGIN
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._deny(scope, receive, send, 413, f"Request body over {limit:,} bytes.")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)

        app = scope.get("app")
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        if payload is not None and app is not None:
            gate = InputGate(self.guard, getattr(app, "uploaded_file_dir", None) or _default_upload_dir())
            try:
                checked = await gate.check(app.get_blocks(), path, payload)
            except InvalidRequest as exc:
                await JSONResponse(validation_detail(exc.parameter, exc.message), status_code=422)(scope, receive, send)
                return
            body = json.dumps(checked).encode("utf-8")
            headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-length"]
            scope["headers"] = [*headers, (b"content-length", str(len(body)).encode("ascii"))]

        await self.app(scope, _replay(body, receive), send)

    async def _cancel(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the cancel hook of the named event, then hand the same request to Gradio."""
        body = await _read_body(receive, _CANCEL_BODY_LIMIT)
        if body is None:
            await self._deny(scope, receive, send, 413, "Cancel request too large.")
            return
        try:
            payload = json.loads(body)
            session_hash, event_id = str(payload["session_hash"]), str(payload["event_id"])
        except (ValueError, KeyError, TypeError):
            pass  # Gradio rejects a malformed body with its own 422
        else:
            if self.cancel_hooks is not None and self.cancel_hooks.cancel(session_hash, event_id):
                logger.debug("cancel hook ran for event %s", event_id)
        await self.app(scope, _replay(body, receive), send)

    async def _watch_stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass an event stream to Gradio; stop the session's jobs if the client drops it.

        Gradio ends a stream itself once the session has no events left. A disconnect
        before that end means the visitor left (a closed tab, a killed script), so the
        session's running jobs stop now rather than at their handlers' next yield.
        """
        query = scope.get("query_string", b"").decode("latin-1")
        session_hash = parse_qs(query).get("session_hash", [""])[0]
        completed = False

        async def watched_send(message: Message) -> None:
            nonlocal completed
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                completed = True
            await send(message)

        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not completed and session_hash and self.cancel_hooks is not None:
                stopped = self.cancel_hooks.cancel_session(session_hash)
                if stopped:
                    logger.info("event stream of session %s dropped: stopped %d job(s)", session_hash[:12], stopped)
            return message

        await self.app(scope, watched_receive, watched_send)

    async def _deny(self, scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """Read a whole request body; None when it is over ``limit`` bytes or the client left."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """Return a receive function that gives ``body`` once, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _find_gradio_user_function(routes: list[Any]) -> Callable[..., Awaitable[str | None]] | None:
    """Find Gradio's ``get_current_user``: the endpoint of its ``/user`` route.

    FastAPI 0.165 keeps included routers as nested route objects, so the search recurses.
    """
    for route in routes:
        nested = getattr(getattr(route, "original_router", None), "routes", None)
        if nested is not None:
            found = _find_gradio_user_function(nested)
            if found is not None:
                return found
            continue
        endpoint = getattr(route, "endpoint", None)
        if getattr(endpoint, "__name__", "") == _GRADIO_USER_FUNCTION and str(getattr(route, "path", "")).rstrip("/").endswith("/user"):
            return endpoint
    return None


def _cookie_user(scope: Scope) -> str | None:
    """Read the Gradio session cookie directly; used only before the user route is found."""
    app = scope.get("app")
    tokens = getattr(app, "tokens", None)
    cookie_id = getattr(app, "cookie_id", None)
    if not tokens or cookie_id is None:
        return None
    cookies = Request(scope).cookies if scope["type"] == "http" else {}
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return tokens.get(token) if token else None


def _default_upload_dir() -> str:
    from gradio.utils import get_upload_folder

    return get_upload_folder()

