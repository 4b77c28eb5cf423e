"""Access control: users, API tokens, and every route of a real server checked without them."""

from __future__ import annotations

import http.client
import io
import json
import logging
import urllib.parse

import pytest
from gradio_client.exceptions import AuthenticationError

from kit.__main__ import main as kit_main
from kit.errors import PresetError
from kit.security.auth import (
    API_TOKENS_ENV,
    USERS_ENV,
    Credentials,
    hash_api_token,
    hash_password,
    load_credentials,
    parse_api_tokens,
    parse_users,
    verify_password,
)
from tests.conftest import demo_preset

PASSWORD = "wonderland-42"
TOKEN = "kit_test-token-for-scripts"
# Routes that must return 401 to a caller with no credentials once access control is on.
# The second group are routes that Gradio 6.31's own auth leaves open.
PRIVATE_ROUTES = [
    ("GET", "/config"),
    ("GET", "/gradio_api/info"),
    ("GET", "/gradio_api/openapi.json"),
    ("POST", "/gradio_api/queue/join"),
    ("GET", "/gradio_api/queue/data?session_hash=abc"),
    ("POST", "/gradio_api/call/generate"),
    ("POST", "/gradio_api/call/gallery"),
    ("GET", "/gradio_api/call/generate/abc"),
    ("POST", "/gradio_api/run/predict"),
    ("POST", "/gradio_api/upload"),
    ("GET", "/gradio_api/upload_progress?upload_id=abc"),
    ("GET", "/gradio_api/heartbeat/abc"),
    ("POST", "/gradio_api/cancel"),
    ("POST", "/gradio_api/reset"),
    ("POST", "/gradio_api/stream/abc"),
    ("GET", "/gradio_api/token"),
    ("GET", "/gradio_api/app_id"),
    ("GET", "/gradio_api/user"),
    ("GET", "/gradio_api/runs"),
    ("GET", "/manifest.json"),
    ("GET", "/theme.css"),
    ("GET", "/favicon.ico"),
    ("GET", "/static/img/logo.svg"),
    ("GET", "/kit-extra"),
]


def site_preset(**security):
    return demo_preset(
        generator={
            "model": "builtin:tiny-sd",
            "visitor_parameters": ["negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "num_images", "init_image", "strength"],
            "defaults": {"steps": 2, "width": 64, "height": 64},
            "limits": {"min_size": 64, "max_size": 128},
        },
        describe={"model": "builtin:tiny-blip"},
        security=security,
    )


@pytest.fixture
def secured(tmp_path, launch_site, monkeypatch):
    """A site with one user (alice) and one API token (for bot), plus a route mounted after launch."""
    users = tmp_path / "users.txt"
    users.write_text(f"# site users\nalice:{hash_password(PASSWORD)}\n")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"bot:{hash_api_token(TOKEN)}\n")
    monkeypatch.delenv(USERS_ENV, raising=False)
    monkeypatch.delenv(API_TOKENS_ENV, raising=False)
    site = launch_site(site_preset(users_file=str(users), api_tokens_file=str(tokens), login_attempts_per_minute=3))
    site.demo.app.add_api_route("/kit-extra", lambda: {"private": True})
    return site


def request(site, method, path, headers=None, body=None, read_all=False):
    """Send one raw HTTP request; return (status, body, cookies).

    Only the first chunk of the body is read, so streams do not block the test, unless
    ``read_all`` asks for the whole body of a plain page.
    """
    port = urllib.parse.urlsplit(site.url).port
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = dict(headers or {})
    if method == "POST" and body is None:
        body, headers["Content-Type"] = b"{}", "application/json"
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    if response.status == 204:
        data = b""
    elif read_all:
        data = response.read()
    else:
        data = response.fp.read1(2000)
    cookies = response.headers.get_all("set-cookie") or []
    connection.close()
    return response.status, data, cookies


def test_password_hash_round_trip():
    encoded = hash_password(PASSWORD)
    assert encoded.startswith("scrypt$16384$8$1$")
    assert PASSWORD not in encoded
    assert verify_password(PASSWORD, encoded)
    assert not verify_password(PASSWORD + "x", encoded)
    assert hash_password(PASSWORD) != encoded  # a fresh salt each time


def test_malformed_hash_never_verifies():
    for encoded in ("", "plain-text", "scrypt$3$8$1$AAAA$AAAA", "md5$x", "scrypt$16384$8$1$!!$!!"):
        assert not verify_password("anything", encoded)


def test_credentials_check_names_and_tokens():
    credentials = Credentials({"alice": hash_password(PASSWORD)}, parse_api_tokens(f"bot:{hash_api_token(TOKEN)}", "t"))
    assert credentials.enabled
    assert credentials.check_password("alice", PASSWORD)
    assert not credentials.check_password("alice", "wrong")
    assert not credentials.check_password("mallory", PASSWORD)
    assert credentials.user_for_token(TOKEN) == "bot"
    assert credentials.user_for_token(TOKEN + "x") is None
    assert not Credentials().enabled


def test_users_file_errors_name_the_line():
    with pytest.raises(PresetError, match="users.txt line 2: expected NAME:scrypt"):
        parse_users(f"alice:{hash_password(PASSWORD)}\nbob:plaintext\n", "users.txt")
    with pytest.raises(PresetError, match="user 'alice' is listed twice"):
        parse_users(f"alice:{hash_password('a')}\nalice:{hash_password('b')}\n", "users.txt")
    with pytest.raises(PresetError, match="tokens line 1: expected NAME:sha256"):
        parse_api_tokens("bot:" + TOKEN, "tokens")


def test_environment_entries_add_up(tmp_path):
    users = tmp_path / "users.txt"
    users.write_text(f"alice:{hash_password(PASSWORD)}\n")
    environ = {
        USERS_ENV: f"bob:{hash_password('builder-pass')}, carol:{hash_password('carol-pass')}",
        API_TOKENS_ENV: f"bot:{hash_api_token(TOKEN)}",
    }
    credentials = load_credentials(users, None, environ)
    assert sorted(credentials.users) == ["alice", "bob", "carol"]
    assert credentials.user_for_token(TOKEN) == "bot"
    assert not load_credentials(None, None, {}).enabled


def test_empty_users_file_is_an_error(tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("# nobody yet\n")
    with pytest.raises(PresetError, match="contain no entries"):
        load_credentials(users, None, {})


def test_cli_prints_entries(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert kit_main(["hash-password", "alice", "--password-stdin"]) == 0
    entry = capsys.readouterr().out.strip()
    assert parse_users(entry, "cli")["alice"].startswith("scrypt$")
    assert Credentials(parse_users(entry, "cli")).check_password("alice", PASSWORD)

    assert kit_main(["new-token", "bot"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
    owners = parse_api_tokens(lines["entry"], "cli")
    assert Credentials(token_owners=owners).user_for_token(lines["token"]) == "bot"


def test_cli_rejects_short_password(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert kit_main(["hash-password", "alice", "--password-stdin"]) == 1
    assert "at least 8" in capsys.readouterr().err


def test_access_control_off_by_default(launch_site):
    site = launch_site(site_preset())
    status, body, _ = request(site, "GET", "/config")
    assert status == 200
    status, body, _ = request(site, "GET", "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_every_route_refuses_anonymous(secured):
    refused = {path: request(secured, method, path)[0] for method, path in PRIVATE_ROUTES}
    assert refused == {path: 401 for _, path in PRIVATE_ROUTES}


def test_public_routes_reveal_nothing(secured):
    status, body, _ = request(secured, "GET", "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, body, _ = request(secured, "GET", "/")
    assert status == 200
    assert b'id="login"' in body
    # Gradio's own page embeds the API description; the sign-in page must not.
    assert b"gradio_api_info" not in body
    assert b"named_endpoints" not in body
    assert request(secured, "GET", "/gradio_api/startup-events")[0] == 200


def test_invalid_token_refused_everywhere(secured):
    headers = {"Authorization": "Bearer kit_wrong"}
    for method, path in [("GET", "/"), *PRIVATE_ROUTES]:
        assert request(secured, method, path, headers)[0] == 401, path
    assert request(secured, "GET", "/healthz", headers)[0] == 200


def test_token_opens_every_route(secured):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    statuses = {path: request(secured, method, path, headers)[0] for method, path in PRIVATE_ROUTES}
    assert not [path for path, status in statuses.items() if status in (401, 403)]
    status, body, _ = request(secured, "GET", "/", headers, read_all=True)
    assert status == 200
    assert b"gradio_config" in body


def test_sign_in_cookie_opens_routes(secured):
    form = urllib.parse.urlencode({"username": "alice", "password": PASSWORD})
    status, _, cookies = request(secured, "POST", "/login", {"Content-Type": "application/x-www-form-urlencoded"}, form)
    assert status == 200
    cookie = "; ".join(header.split(";", 1)[0] for header in cookies)
    assert request(secured, "GET", "/config", {"Cookie": cookie})[0] == 200
    assert request(secured, "GET", "/kit-extra", {"Cookie": cookie})[0] == 200
    assert request(secured, "GET", "/gradio_api/heartbeat/abc", {"Cookie": cookie})[0] == 200


def test_client_needs_credentials(secured):
    with pytest.raises(AuthenticationError):
        secured.client()


def test_token_user_owns_gallery_entries(secured):
    client = secured.client(headers={"Authorization": f"Bearer {TOKEN}"})
    _, record, _ = client.predict(prompt="a red circle", seed=3, api_name="/generate")
    assert len(record["entry_ids"]) == 1
    entry = secured.services.gallery.get(record["entry_ids"][0], owner="*")
    assert entry.owner == "user:bot"
    listing = client.predict(api_name="/gallery")
    assert [item["prompt"] for item in listing["entries"]] == ["a red circle"]


def test_password_user_through_client(secured):
    client = secured.client(auth=("alice", PASSWORD))
    _, record, _ = client.predict(prompt="a blue square", seed=4, api_name="/generate")
    assert secured.services.gallery.get(record["entry_ids"][0], owner="*").owner == "user:alice"
    assert client.predict(api_name="/gallery")["total"] == 1


def test_failed_sign_ins_are_limited(secured):
    form = urllib.parse.urlencode({"username": "alice", "password": "wrong"})
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    statuses = [request(secured, "POST", "/login", headers, form)[0] for _ in range(4)]
    assert statuses == [400, 400, 400, 429]
    good = urllib.parse.urlencode({"username": "alice", "password": PASSWORD})
    status, body, _ = request(secured, "POST", "/login", headers, good)
    assert status == 429
    assert b"Try again in" in body


def test_secrets_never_logged(secured, caplog):
    caplog.set_level(logging.DEBUG)
    form = urllib.parse.urlencode({"username": "alice", "password": PASSWORD})
    request(secured, "POST", "/login", {"Content-Type": "application/x-www-form-urlencoded"}, form)
    request(secured, "GET", "/config", {"Authorization": f"Bearer {TOKEN}"})
    request(secured, "GET", "/config", {"Authorization": "Bearer kit_wrong-token-value"})
    assert PASSWORD not in caplog.text
    assert TOKEN not in caplog.text
    assert "kit_wrong-token-value" not in caplog.text
