"""Images by URL: address checks, allowlist, redirects and caps, without reaching any outside host.

Every network test talks only to a loopback server that the test starts. Rejections happen
before any connection: the fake resolvers here fail the test if they are called when they
must not be, and the conftest socket guard records any connection to a non-loopback address.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import ValidationError
from PIL import Image

from kit.errors import InvalidRequest
from kit.security import guard_for
from kit.security.fetch import UrlFetcher, address_problem, decode_data_url, host_allowed
from tests.conftest import OUTSIDE_CONNECTIONS
from tests.test_security_auth import site_preset

LOOPBACK = ipaddress.ip_address("127.0.0.1")


def png_bytes(size=(32, 32), colour=(0, 128, 255)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


class ImageServer:
    """A loopback HTTP server with a few routes; it records the Host header of every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.redirect_to = ""
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Host", "")))
                if self.path == "/image.png":
                    self._send(200, png_bytes(), "image/png")
                elif self.path == "/big":
                    self._send(200, b"\x00" * 2_000_000, "image/png")
                elif self.path == "/big-chunked":
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    chunk = b"\x00" * 65536
                    for _ in range(40):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.write(b"0\r\n\r\n")
                elif self.path == "/slow":
                    time.sleep(3)
                    self._send(200, png_bytes(), "image/png")
                elif self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", server.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/loop":
                    self.send_response(302)
                    self.send_header("Location", "/loop")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/text":
                    self._send(200, b"hello", "text/plain")
                else:
                    self._send(404, b"not found", "text/plain")

            def _send(self, status, body, content_type):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def image_server():
    server = ImageServer()
    yield server
    server.close()


def never_resolve(host: str, port: int):
    raise AssertionError(f"{host} was resolved, but the URL should have been rejected before any lookup")


def fake_resolver(mapping):
    """Return a resolver that resolves only the names in ``mapping``."""

    def resolve(host: str, port: int):
        if host not in mapping:
            raise OSError(f"unknown test host {host}")
        return mapping[host]

    return resolve


def loopback_only(address):
    """Address check for tests: the loopback test server is the one non-public address allowed."""
    return None if address == LOOPBACK else address_problem(address)


def fetch(fetcher: UrlFetcher, url: str) -> bytes:
    return asyncio.run(fetcher.fetch(url, "image")).content


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("169.254.10.10", "link-local"),
        ("224.0.0.251", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "reserved"),
        ("240.0.0.1", ("private", "reserved")),  # Python versions file 240/4 under either
        ("::1", "loopback"),
        ("fd00:ec2::254", "cloud metadata"),
        ("fd12:3456::1", "private"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "cloud metadata"),
        ("64:ff9b::a00:1", "private"),
        ("2002:7f00:1::", "loopback"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_classes(address, reason):
    problem = address_problem(ipaddress.ip_address(address))
    if reason is None:
        assert problem is None
    else:
        assert any(word in problem for word in ((reason,) if isinstance(reason, str) else reason))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1/x.png", "loopback"),
        ("http://[::1]:8080/x.png", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata"),
        ("http://[::ffff:169.254.169.254]/", "cloud metadata"),
        ("http://10.1.2.3/x.png", "private"),
        ("http://metadata.google.internal/computeMetadata/v1/", "not accepted"),
        ("http://metadata/computeMetadata/v1/", "not accepted"),
        ("http://localhost:7860/config", "not accepted"),
        ("http://printer.local/x.png", "not accepted"),
        ("http://app.localhost/x.png", "not accepted"),
        ("ftp://images.example.com/x.png", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("gopher://images.example.com/x", "only http and https"),
        ("http://user:secret@images.example.com/x.png", "user name or password"),
        ("http://other.example.com/x.png", "not accepted on this site; allowed hosts"),
        ("http://images.example.com.evil.test/x.png", "not accepted on this site"),
        ("http://images.example.com:8080/x.png", "not accepted on this site"),
        ("http:///x.png", "no host"),
    ],
)
def test_urls_rejected_before_lookup(url, message):
    fetcher = UrlFetcher(["images.example.com"], max_bytes=1_000_000, timeout=5, resolver=never_resolve)
    before = len(OUTSIDE_CONNECTIONS)
    with pytest.raises(InvalidRequest, match=message):
        fetch(fetcher, url)
    assert len(OUTSIDE_CONNECTIONS) == before


def test_urls_off_without_allowlist():
    fetcher = UrlFetcher([], max_bytes=1_000_000, timeout=5, resolver=never_resolve)
    with pytest.raises(InvalidRequest, match="image URLs are not accepted on this site; upload the file or send a data URL"):
        fetch(fetcher, "https://images.example.com/x.png")


def test_allowlist_patterns():
    allowlist = ["images.example.com", "*.cdn.example.org", "static.example.net:8443"]
    assert host_allowed("images.example.com", 443, allowlist)
    assert host_allowed("IMAGES.example.com.", 80, allowlist)
    assert host_allowed("a.b.cdn.example.org", 443, allowlist)
    assert not host_allowed("cdn.example.org", 443, allowlist)
    assert not host_allowed("evilcdn.example.org", 443, allowlist)
    assert host_allowed("static.example.net", 8443, allowlist)
    assert not host_allowed("static.example.net", 443, allowlist)
    assert not host_allowed("images.example.com", 8080, allowlist)


@pytest.mark.parametrize(
    ("addresses", "reason"),
    [(["10.0.0.5"], "private"), (["93.184.216.34", "127.0.0.1"], "loopback"), (["169.254.169.254"], "cloud metadata"), ([], "could not be resolved")],
)
def test_allowlisted_name_with_internal_address_rejected(addresses, reason):
    """DNS for an allowed name can still point inside; every answer is checked before connecting."""
    fetcher = UrlFetcher(
        ["images.example.com"], max_bytes=1_000_000, timeout=5, resolver=fake_resolver({"images.example.com": addresses})
    )
    before = len(OUTSIDE_CONNECTIONS)
    with pytest.raises(InvalidRequest, match=reason):
        fetch(fetcher, "https://images.example.com/x.png")
    assert len(OUTSIDE_CONNECTIONS) == before


def allowed_fetcher(server: ImageServer, **options) -> UrlFetcher:
    return UrlFetcher(
        [f"images.test:{server.port}"],
        max_bytes=options.pop("max_bytes", 1_000_000),
        timeout=options.pop("timeout", 5),
        resolver=fake_resolver({"images.test": ["127.0.0.1"], "evil.test": ["127.0.0.1"]}),
        address_check=loopback_only,
        **options,
    )


def test_allowed_host_fetched_from_checked_address(image_server):
    content = fetch(allowed_fetcher(image_server), f"http://images.test:{image_server.port}/image.png")
    assert content == png_bytes()
    assert image_server.requests == [("/image.png", f"images.test:{image_server.port}")]


def test_redirect_to_metadata_rejected(image_server):
    image_server.redirect_to = "http://169.254.169.254/latest/meta-data/iam/"
    with pytest.raises(InvalidRequest, match="cloud metadata"):
        fetch(allowed_fetcher(image_server), f"http://images.test:{image_server.port}/redirect")
    assert [path for path, _ in image_server.requests] == ["/redirect"]


def test_redirect_to_other_host_rejected(image_server):
    image_server.redirect_to = f"http://evil.test:{image_server.port}/image.png"
    with pytest.raises(InvalidRequest, match="images from evil.test are not accepted"):
        fetch(allowed_fetcher(image_server), f"http://images.test:{image_server.port}/redirect")
    assert [path for path, _ in image_server.requests] == ["/redirect"]


def test_redirect_within_allowlist_followed(image_server):
    image_server.redirect_to = "/image.png"
    assert fetch(allowed_fetcher(image_server), f"http://images.test:{image_server.port}/redirect") == png_bytes()


def test_redirect_loop_stops(image_server):
    with pytest.raises(InvalidRequest, match="redirected more than 3 times"):
        fetch(allowed_fetcher(image_server), f"http://images.test:{image_server.port}/loop")
    assert len(image_server.requests) == 4


@pytest.mark.parametrize("path", ["/big", "/big-chunked"])
def test_size_capped(image_server, path):
    with pytest.raises(InvalidRequest, match="larger than the 1 MB limit"):
        fetch(allowed_fetcher(image_server), f"http://images.test:{image_server.port}{path}")


def test_time_capped(image_server):
    started = time.monotonic()
    with pytest.raises(InvalidRequest, match="took longer than 0.5 s"):
        fetch(allowed_fetcher(image_server, timeout=0.5), f"http://images.test:{image_server.port}/slow")
    assert time.monotonic() - started < 2.5


def test_error_status_reported(image_server):
    with pytest.raises(InvalidRequest, match="HTTP 404"):
        fetch(allowed_fetcher(image_server), f"http://images.test:{image_server.port}/missing")


def data_url(content: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(content).decode("ascii")


def test_data_urls_decoded_within_cap():
    assert decode_data_url(data_url(png_bytes()), "image", 1_000_000) == png_bytes()
    with pytest.raises(InvalidRequest, match="contains text/html, not an image"):
        decode_data_url(data_url(b"<p>", "text/html"), "image", 1_000_000)
    with pytest.raises(InvalidRequest, match="not valid base64"):
        decode_data_url("data:image/png;base64,@@@@", "image", 1_000_000)
    with pytest.raises(InvalidRequest, match="larger than"):
        decode_data_url(data_url(b"\x00" * 5000), "image", 4000)
    with pytest.raises(InvalidRequest, match="must look like"):
        decode_data_url("data:image/png,rawbytes", "image", 1_000_000)


# -- through a running site --------------------------------------------------------------------


def call(site, endpoint: str, data: list) -> tuple[int, object]:
    """POST to /gradio_api/call/ENDPOINT; return (status, parsed result or error detail)."""
    body = json.dumps({"data": data}).encode()
    post = urllib.request.Request(f"{site.url}gradio_api/call/{endpoint}", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(post, timeout=30) as response:
            event_id = json.load(response)["event_id"]
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    with urllib.request.urlopen(f"{site.url}gradio_api/call/{endpoint}/{event_id}", timeout=60) as stream:
        lines = stream.read().decode().splitlines()
    events = [line.split(": ", 1)[1] for line in lines if line.startswith("event: ")]
    payloads = [line.split(": ", 1)[1] for line in lines if line.startswith("data: ")]
    return (200 if events[-1] == "complete" else 500), json.loads(payloads[-1])


def test_data_url_accepted_by_api(launch_site):
    site = launch_site(site_preset())
    status, caption = call(site, "describe", [data_url(png_bytes())])
    assert status == 200
    assert isinstance(caption[0], str)


def test_url_to_allowlisted_host_fetched_by_kit(launch_site, image_server):
    site = launch_site(site_preset(url_allowlist=[f"images.test:{image_server.port}"]))
    guard_for(site.services).fetcher = allowed_fetcher(image_server)
    status, caption = call(site, "describe", [f"http://images.test:{image_server.port}/image.png"])
    assert status == 200
    assert isinstance(caption[0], str)
    assert image_server.requests == [("/image.png", f"images.test:{image_server.port}")]


def test_metadata_url_rejected_without_connection(launch_site):
    site = launch_site(site_preset(url_allowlist=["images.example.com"]))
    before = len(OUTSIDE_CONNECTIONS)
    status, detail = call(site, "describe", ["http://169.254.169.254/latest/meta-data/"])
    assert status == 422
    assert "cloud metadata address" in detail["detail"][0]["message"]
    with pytest.raises(ValidationError, match="cloud metadata address"):
        site.client().predict(image=handle_file("http://169.254.169.254/latest/meta-data/x.png"), api_name="/describe")
    with pytest.raises(ValidationError, match="cloud metadata address"):
        site.client().predict(prompt="x", init_image=handle_file("http://[fd00:ec2::254]/x.png"), api_name="/generate")
    assert len(OUTSIDE_CONNECTIONS) == before


def test_gradio_never_fetches_file_urls(launch_site, image_server):
    """A FileData whose path is a URL would be downloaded by Gradio itself; the kit stops it first."""
    site = launch_site(site_preset())
    url = f"http://127.0.0.1:{image_server.port}/image.png"
    file_data = {"path": url, "meta": {"_type": "gradio.FileData"}}
    status, detail = call(site, "describe", [file_data])
    assert status == 422
    assert "loopback address" in detail["detail"][0]["message"]
    status, detail = call(site, "generate", ["x", "", 1, 2, 5.0, 64, 64, 1, file_data, 0.6])
    assert status == 422
    assert detail["detail"][0]["parameter_name"] == "init_image"
    assert image_server.requests == []


def test_keyword_call_route_checked(launch_site):
    from tests.test_images import bomb_png

    site = launch_site(site_preset())

    def post(body: dict) -> int:
        data = json.dumps(body).encode()
        post_request = urllib.request.Request(f"{site.url}gradio_api/call/v2/describe", data, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(post_request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert post({"image": data_url(png_bytes())}) == 200
    assert post({"image": data_url(bomb_png(30000, 30000))}) == 422
    assert post({"image": "http://169.254.169.254/latest/meta-data/"}) == 422
