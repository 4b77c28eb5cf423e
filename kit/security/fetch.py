"""Fetch images that API callers name by URL, without ever reaching an internal address.

Every hop (the first request and each redirect) is checked before any connection. The scheme
must be http or https and the URL must carry no user info. The host must be on the preset's
allowlist and not a known internal name, and every address it resolves to must be public.
The connection then goes to the checked address (the Host header and TLS server name keep the host name),
so a DNS answer that changes between the check and the connect cannot redirect it. The body
is capped in bytes and the whole fetch in seconds. Data URLs are decoded with the same cap.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from kit.errors import InvalidRequest

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]
AddressCheck = Callable[[IPAddress], "str | None"]

MAX_REDIRECTS = 3
_REDIRECT_STATUSES = {301, 302, 303, 307, 308}

# Cloud metadata services. Most are link-local or private already. They are listed so that the
# reason in the message is exact, and so that a change to ipaddress cannot let them through.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in ("169.254.169.254", "169.254.170.2", "169.254.169.253", "fd00:ec2::254", "100.100.100.200")
)
# Names that point inside the machine or the cloud network, rejected before any DNS lookup.
BLOCKED_HOST_NAMES = frozenset({"localhost", "metadata", "metadata.google.internal", "instance-data"})
BLOCKED_HOST_SUFFIXES = (".localhost", ".internal", ".local", ".localdomain", ".home.arpa")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_DATA_URL = re.compile(r"^data:([a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+)?((?:;[a-z0-9_.+-]+=[^;,]*)*);base64,", re.IGNORECASE)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_problem(address: IPAddress) -> str | None:
    """Return why ``address`` must not be fetched from, or None when it is a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            problem = address_problem(embedded)
            if problem:
                return f"{problem} inside an IPv6 address"
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_private:
        return "a private address"
    if address.is_reserved or not address.is_global:
        return "a reserved address"
    return None


def system_resolver(host: str, port: int) -> list[str]:
    """Resolve ``host`` with the operating system's resolver; return every address, in its order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = []
    for _family, _type, _proto, _name, sockaddr in infos:
        if sockaddr[0] not in addresses:
            addresses.append(str(sockaddr[0]))
    return addresses


def host_allowed(host: str, port: int, allowlist: Sequence[str]) -> bool:
    """Return whether ``host:port`` matches an allowlist entry (``name``, ``*.name``, ``name:port``)."""
    host = host.lower().rstrip(".")
    for entry in allowlist:
        pattern, _, entry_port = entry.lower().partition(":")
        if entry_port and int(entry_port) != port:
            continue
        if not entry_port and port not in (80, 443):
            continue
        if pattern.startswith("*."):
            suffix = pattern[1:]
            if host.endswith(suffix) and len(host) > len(suffix):
                return True
        elif host == pattern:
            return True
    return False


@dataclass(frozen=True)
class Target:
    """One checked hop: the URL to request and the address to connect to."""

    url: str
    host: str
    port: int
    address: IPAddress


class _PinnedTransport(httpx.AsyncHTTPTransport):
    """Connect to an address that was checked beforehand, keeping the host name for Host and TLS."""

    def __init__(self, target: Target, **kwargs: Any):
        super().__init__(**kwargs)
        self._target = target

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.raw_host.decode("ascii").lower().rstrip(".") != self._target.host:
            raise httpx.ConnectError("request to an unchecked host", request=request)
        request.headers["Host"] = request.url.netloc.decode("ascii")
        request.extensions = {**request.extensions, "sni_hostname": self._target.host}
        request.url = request.url.copy_with(host=str(self._target.address))
        return await super().handle_async_request(request)


@dataclass(frozen=True)
class Fetched:
    content: bytes
    content_type: str
    url: str


class UrlFetcher:
    """Fetches image URLs from allowlisted public hosts. Resolver and address check are seams for tests."""

    def __init__(
        self,
        allowlist: Sequence[str],
        *,
        max_bytes: int,
        timeout: float,
        resolver: Resolver = system_resolver,
        address_check: AddressCheck = address_problem,
        max_redirects: int = MAX_REDIRECTS,
    ):
        self.allowlist = tuple(allowlist)
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.resolver = resolver
        self.address_check = address_check
        self.max_redirects = max_redirects

    def check_url(self, url: str, parameter: str) -> tuple[str, str, int]:
        """Check a URL without any network access; return (url, host, port) or raise InvalidRequest."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError):
            raise InvalidRequest(parameter, f"{parameter}: the URL is not valid.") from None

        scheme = parsed.scheme.lower()
        if scheme not in ("http", "https"):
            raise InvalidRequest(parameter, f"{parameter}: only http and https URLs are accepted, got {scheme or 'none'}.")
        if parsed.userinfo:
            raise InvalidRequest(parameter, f"{parameter}: URLs with a user name or password are not accepted.")
        # raw_host is the ASCII (IDNA) form, the one DNS, the Host header and TLS use.
        host = parsed.raw_host.decode("ascii").lower().rstrip(".")
        if not host:
            raise InvalidRequest(parameter, f"{parameter}: the URL has no host.")
        port = parsed.port or (443 if scheme == "https" else 80)

        if host in BLOCKED_HOST_NAMES or host.endswith(BLOCKED_HOST_SUFFIXES):
            raise InvalidRequest(parameter, f"{parameter}: URLs to {host} are not accepted.")
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            problem = self.address_check(literal)
            if problem:
                raise InvalidRequest(parameter, f"{parameter}: the URL points to {problem}, which is not accepted.")

        if not self.allowlist:
            raise InvalidRequest(
                parameter, f"{parameter}: image URLs are not accepted on this site; upload the file or send a data URL."
            )
        if not host_allowed(host, port, self.allowlist):
            raise InvalidRequest(
                parameter,
                f"{parameter}: images from {host} are not accepted on this site; allowed hosts: {', '.join(self.allowlist)}.",
            )
        return url, host, port

    async def resolve(self, url: str, parameter: str) -> Target:
        """Check a URL, resolve its host once and check every address; return where to connect."""
        url, host, port = self.check_url(url, parameter)
        try:
            literal = ipaddress.ip_address(host)
            addresses = [str(literal)]
        except ValueError:
            try:
                addresses = list(await asyncio.to_thread(self.resolver, host, port))
            except OSError:
                raise InvalidRequest(parameter, f"{parameter}: the host {host} could not be resolved.") from None
        if not addresses:
            raise InvalidRequest(parameter, f"{parameter}: the host {host} could not be resolved.")
        checked = []
        for text in addresses:
            address = ipaddress.ip_address(text.split("%", 1)[0])
            problem = self.address_check(address)
            if problem:
                logger.warning("rejected an image URL: %s resolves to %s", host, problem)
                raise InvalidRequest(parameter, f"{parameter}: the host {host} resolves to {problem}, which is not accepted.")
            checked.append(address)
        return Target(url, host, port, checked[0])

    async def fetch(self, url: str, parameter: str) -> Fetched:
        """Download ``url`` within the size and time caps, checking every redirect hop."""
        try:
            return await asyncio.wait_for(self._fetch(url, parameter), timeout=self.timeout)
        except asyncio.TimeoutError:
            raise InvalidRequest(parameter, f"{parameter}: fetching the image took longer than {self.timeout:g} s.") from None

    async def _fetch(self, url: str, parameter: str) -> Fetched:
        current = url
        for _hop in range(self.max_redirects + 1):
            target = await self.resolve(current, parameter)
            transport = _PinnedTransport(target, retries=0)
            async with httpx.AsyncClient(
                transport=transport, trust_env=False, follow_redirects=False, timeout=self.timeout
            ) as client:
                try:
                    async with client.stream("GET", target.url, headers={"Accept": "image/*"}) as response:
                        if response.status_code in _REDIRECT_STATUSES and "location" in response.headers:
                            # The response URL carries the address; rebuild the next hop on the host name.
                            current = str(httpx.URL(target.url).join(response.headers["location"]))
                            continue
                        if response.status_code != 200:
                            raise InvalidRequest(
                                parameter, f"{parameter}: the image URL answered HTTP {response.status_code}."
                            )
                        content = await self._read_capped(response, parameter)
                        return Fetched(content, response.headers.get("content-type", ""), target.url)
                except httpx.HTTPError as exc:
                    raise InvalidRequest(parameter, f"{parameter}: the image could not be fetched ({type(exc).__name__}).") from None
        raise InvalidRequest(parameter, f"{parameter}: the image URL redirected more than {self.max_redirects} times.")

    async def _read_capped(self, response: httpx.Response, parameter: str) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise InvalidRequest(parameter, _too_big(parameter, self.max_bytes))
        chunks = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise InvalidRequest(parameter, _too_big(parameter, self.max_bytes))
            chunks.append(chunk)
        return b"".join(chunks)


def _too_big(parameter: str, max_bytes: int) -> str:
    return f"{parameter}: the image is larger than the {max_bytes / 1_000_000:g} MB limit on this site."


def decode_data_url(text: str, parameter: str, max_bytes: int) -> bytes:
    """Decode a ``data:image/...;base64,`` URL within ``max_bytes``; raise InvalidRequest otherwise."""
    match = _DATA_URL.match(text)
    if match is None:
        raise InvalidRequest(parameter, f"{parameter}: a data URL must look like data:image/png;base64,....")
    mime = (match.group(1) or "").lower()
    if mime and not mime.startswith("image/"):
        raise InvalidRequest(parameter, f"{parameter}: the data URL contains {mime}, not an image.")
    encoded = text[match.end():]
    if len(encoded) > (max_bytes + 2) // 3 * 4 + 4:
        raise InvalidRequest(parameter, _too_big(parameter, max_bytes))
    try:
        content = base64.b64decode(re.sub(r"\s+", "", encoded), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(parameter, f"{parameter}: the data URL is not valid base64.") from None
    if len(content) > max_bytes:
        raise InvalidRequest(parameter, _too_big(parameter, max_bytes))
    return content

