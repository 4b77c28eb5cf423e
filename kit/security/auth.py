"""Users and API tokens: hashed secrets read from files or the environment.

A users entry is ``name:scrypt$N$r$p$salt$key`` (salt and key in URL-safe base64), made by
``python -m kit hash-password``. An API token entry is ``name:sha256$hexdigest``, made by
``python -m kit new-token NAME``; the token itself is shown once and never stored. Files
take one entry per line (``#`` starts a comment); the KIT_USERS and KIT_API_TOKENS
environment variables take entries separated by commas or newlines.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kit.errors import PresetError

logger = logging.getLogger(__name__)

USERS_ENV = "KIT_USERS"
API_TOKENS_ENV = "KIT_API_TOKENS"

# scrypt with N=2**14, r=8, p=1 takes about 16 MiB and tens of milliseconds per check.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
_SCRYPT_MAXMEM = 128 * 1024 * 1024
TOKEN_PREFIX = "kit_"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_PASSWORD_HASH = re.compile(r"^scrypt\$(\d+)\$(\d+)\$(\d+)\$([A-Za-z0-9_-]+={0,2})\$([A-Za-z0-9_-]+={0,2})$")
_TOKEN_HASH = re.compile(r"^sha256\$([0-9a-f]{64})$")


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """Return the scrypt hash of ``password`` with a fresh random salt, as stored in a users entry."""
    salt = salt if salt is not None else os.urandom(SALT_BYTES)
    key = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=KEY_BYTES, maxmem=_SCRYPT_MAXMEM
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64encode(salt)}${_b64encode(key)}"


def verify_password(password: str, encoded: str) -> bool:
    """Check ``password`` against a stored scrypt hash in constant time."""
    match = _PASSWORD_HASH.match(encoded)
    if match is None:
        return False
    n, r, p = (int(group) for group in match.groups()[:3])
    salt, expected = _b64decode(match.group(4)), _b64decode(match.group(5))
    try:
        key = hashlib.scrypt(
            password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=len(expected), maxmem=_SCRYPT_MAXMEM
        )
    except ValueError:  # parameters that scrypt rejects, e.g. an N that is not a power of two
        return False
    return hmac.compare_digest(key, expected)


def new_api_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_api_token(token: str) -> str:
    """Return the stored form of an API token. Tokens are long and random, so one SHA-256 suffices."""
    return "sha256$" + hashlib.sha256(token.encode("utf-8")).hexdigest()


@functools.cache
def _dummy_hash() -> str:
    # A password check for an unknown user still runs scrypt, so timing does not reveal user names.
    return hash_password("unused", salt=b"\x00" * SALT_BYTES)


@dataclass(frozen=True)
class Credentials:
    """The users who may sign in and the API tokens that scripts may send."""

    users: Mapping[str, str] = field(default_factory=dict)  # user name -> password hash
    token_owners: Mapping[str, str] = field(default_factory=dict)  # SHA-256 hex digest -> user name

    @property
    def enabled(self) -> bool:
        return bool(self.users or self.token_owners)

    def check_password(self, username: str, password: str) -> bool:
        encoded = self.users.get(username)
        valid = verify_password(password, encoded or _dummy_hash())
        return valid and encoded is not None

    def user_for_token(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
        return self.token_owners.get(digest)


def _split_entries(text: str, *, commas: bool) -> list[tuple[int, str]]:
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        parts = line.split(",") if commas else [line]
        entries.extend((number, part.strip()) for part in parts if part.strip())
    return entries


def parse_users(text: str, source: str, *, commas: bool = False) -> dict[str, str]:
    """Parse users entries (``name:scrypt$...``); raise PresetError naming the source and line."""
    users: dict[str, str] = {}
    for number, entry in _split_entries(text, commas=commas):
        name, _, encoded = entry.partition(":")
        name = name.strip()
        if not _NAME.match(name) or not _PASSWORD_HASH.match(encoded.strip()):
            raise PresetError(
                f"{source} line {number}: expected NAME:scrypt$..., as printed by `python -m kit hash-password`; "
                "names use letters, digits and . _ @ - (up to 64 characters)"
            )
        if name in users:
            raise PresetError(f"{source} line {number}: user {name!r} is listed twice")
        users[name] = encoded.strip()
    return users


def parse_api_tokens(text: str, source: str, *, commas: bool = False) -> dict[str, str]:
    """Parse API token entries (``name:sha256$hex``) into a digest -> user name mapping."""
    owners: dict[str, str] = {}
    for number, entry in _split_entries(text, commas=commas):
        name, _, encoded = entry.partition(":")
        name = name.strip()
        match = _TOKEN_HASH.match(encoded.strip())
        if not _NAME.match(name) or match is None:
            raise PresetError(
                f"{source} line {number}: expected NAME:sha256$HEX, as printed by `python -m kit new-token NAME`"
            )
        owners[match.group(1)] = name
    return owners


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PresetError(f"{what} {path} could not be read: {exc.strerror or exc}") from None


def resolve_secret_path(value: str, preset_source: str) -> Path:
    """Resolve a users or tokens file named in a preset: relative paths start at the preset's folder."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    source = Path(preset_source)
    base = source.parent if source.suffix == ".toml" and source.is_file() else Path.cwd()
    return (base / path).resolve()


def load_credentials(
    users_file: Path | None, api_tokens_file: Path | None, environ: Mapping[str, str] | None = None
) -> Credentials:
    """Read users and tokens from the named files and the environment; both sources add up."""
    environ = os.environ if environ is None else environ
    users: dict[str, str] = {}
    owners: dict[str, str] = {}
    if users_file is not None:
        users.update(parse_users(_read(users_file, "users file"), str(users_file)))
    if environ.get(USERS_ENV, "").strip():
        for name, encoded in parse_users(environ[USERS_ENV], USERS_ENV, commas=True).items():
            if name in users:
                raise PresetError(f"{USERS_ENV}: user {name!r} is also in the users file; keep one entry")
            users[name] = encoded
    if api_tokens_file is not None:
        owners.update(parse_api_tokens(_read(api_tokens_file, "API tokens file"), str(api_tokens_file)))
    if environ.get(API_TOKENS_ENV, "").strip():
        owners.update(parse_api_tokens(environ[API_TOKENS_ENV], API_TOKENS_ENV, commas=True))
    if users_file is not None or api_tokens_file is not None:
        if not users and not owners:
            raise PresetError(
                "access control is configured, but the users and API tokens files contain no entries; "
                "add an entry, or remove security.users_file and security.api_tokens_file"
            )
    credentials = Credentials(users, owners)
    if credentials.enabled:
        logger.info("access control on: %d user(s), %d API token(s)", len(users), len(owners))
    return credentials
