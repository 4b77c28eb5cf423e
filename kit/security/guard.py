"""One site's security settings turned into working parts: credentials, limits, blocklist, fetcher."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit.presets import Preset, SecuritySettings
from kit.security.auth import Credentials, load_credentials, resolve_secret_path
from kit.security.fetch import UrlFetcher
from kit.security.limits import JobLimiter, SlidingWindow, TermBlocklist, identity_for

logger = logging.getLogger(__name__)

_GUARD_ATTRIBUTE = "_kit_site_guard"


@dataclass
class SiteGuard:
    """Credentials, limits, blocklist and fetcher that enforce a preset's [security] section."""

    settings: SecuritySettings
    credentials: Credentials
    images_dir: Path
    data_dir: Path
    limiter: JobLimiter
    blocklist: TermBlocklist
    fetcher: UrlFetcher
    login_failures: SlidingWindow
    secret_files: list[Path] = field(default_factory=list)
    site_title: str = "Microsite Kit"

    @classmethod
    def from_preset(cls, preset: Preset, data_dir: Path, images_dir: Path) -> SiteGuard:
        settings = preset.security
        users_file = resolve_secret_path(settings.users_file, preset.source) if settings.users_file else None
        tokens_file = resolve_secret_path(settings.api_tokens_file, preset.source) if settings.api_tokens_file else None
        return cls(
            settings=settings,
            credentials=load_credentials(users_file, tokens_file),
            images_dir=Path(images_dir),
            data_dir=Path(data_dir),
            limiter=JobLimiter(settings.jobs_per_minute, settings.max_queued_per_identity),
            blocklist=TermBlocklist(settings.blocked_terms),
            fetcher=UrlFetcher(
                settings.url_allowlist, max_bytes=upload_limit_bytes(settings), timeout=settings.url_fetch_timeout_seconds
            ),
            login_failures=SlidingWindow(settings.login_attempts_per_minute),
            secret_files=[path for path in (users_file, tokens_file) if path is not None],
            site_title=preset.site.title,
        )

    @property
    def access_control(self) -> bool:
        return self.credentials.enabled

    @property
    def max_upload_bytes(self) -> int:
        return upload_limit_bytes(self.settings)

    def check_login(self, username: str, password: str) -> bool:
        """Gradio's ``auth`` callable: check a user name and password against the users list."""
        return self.credentials.check_password(username, password)

    def blocked_paths(self) -> list[str]:
        """Return the files under the data folder that must never be served, even if allowed_paths covers them."""
        data = self.data_dir
        paths = [data / "gallery.sqlite3", data / "gallery.sqlite3-wal", data / "gallery.sqlite3-shm"]
        paths += [data / "browser-state.key", data / "models", *self.secret_files]
        return [str(path) for path in paths]

    def admit(self, request: Any, *, prompt: str | None = None, parameter: str = "prompt") -> None:
        """Check a job before it is queued: the prompt blocklist, then the caller's job limits.

        ``request`` is the event's ``gr.Request`` (None for calls from Python, which skip the
        limits). Raises InvalidRequest with a message for the caller.
        """
        if prompt is not None:
            self.blocklist.check(prompt, "prompt")
        if request is None or not self.limiter.enabled:
            return
        identity = request_identity(request)
        queued = queued_jobs(request, identity) if self.limiter.max_queued else 0
        self.limiter.admit(identity, queued, parameter)


def upload_limit_bytes(settings: SecuritySettings) -> int:
    return int(settings.max_upload_mb * 1_000_000)


def request_identity(request: Any) -> str:
    client = getattr(request, "client", None)
    return identity_for(getattr(request, "username", None), getattr(client, "host", None))


def queued_jobs(request: Any, identity: str) -> int:
    """Count the jobs that ``identity`` has waiting or running in Gradio's queue.

    A job here is an event whose listener has a validator, which in the kit means generate
    and describe. NOTE: this reads Gradio 6.31's queue internals (``Blocks._queue`` and its
    ``event_ids_to_events``). If a Gradio release moves them, the count is 0 and a warning is
    logged, and only the per-minute limit applies.
    """
    try:
        blocks = request.request.app.get_blocks()
        events = list(blocks._queue.event_ids_to_events.values())
    except AttributeError:
        logger.warning("could not read Gradio's queue; the limit on queued jobs per visitor is not applied")
        return 0
    count = 0
    for event in events:
        if getattr(event.fn, "validator", None) is None:
            continue
        client = getattr(event.request, "client", None)
        if identity_for(event.username, getattr(client, "host", None)) == identity:
            count += 1
    return count


def guard_for(services: Any) -> SiteGuard:
    """Return the SiteGuard of a site's services, building it on first use."""
    guard = getattr(services, _GUARD_ATTRIBUTE, None)
    if guard is None:
        guard = SiteGuard.from_preset(services.preset, services.data_dir, services.gallery.images_dir)
        setattr(services, _GUARD_ATTRIBUTE, guard)
    return guard


def admit_job(services: Any, request: Any, *, prompt: str | None = None, parameter: str = "prompt") -> None:
    """Validator hook: raise InvalidRequest when a job must not be queued (blocklist, job limits)."""
    guard_for(services).admit(request, prompt=prompt, parameter=parameter)


__all__ = ["SiteGuard", "admit_job", "guard_for", "queued_jobs"]
