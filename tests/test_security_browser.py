"""Signing in with a real browser: the kit's sign-in page, then the Gradio app through the middleware."""

from __future__ import annotations

import time
import urllib.parse
from pathlib import Path

import pytest

from kit.security.auth import API_TOKENS_ENV, USERS_ENV, hash_password
from tests.test_security_auth import site_preset

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
PASSWORD = "wonderland-42"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")
def test_sign_in_then_generate(launch_site, monkeypatch):
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv(USERS_ENV, f"alice:{hash_password(PASSWORD)}")
    monkeypatch.delenv(API_TOKENS_ENV, raising=False)
    site = launch_site(site_preset())
    failures: list[str] = []
    outside: list[str] = []

    def loopback_only(route):
        if urllib.parse.urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            page = browser.new_context().new_page()
            page.route("**/*", loopback_only)
            page.goto(site.url)
            page.fill("#username", "alice")
            page.fill("#password", "wrong-password")
            page.click("button[type=submit]")
            page.wait_for_selector("#message:has-text('Incorrect user name or password.')", timeout=15_000)

            page.on("response", lambda response: failures.append(f"{response.status} {response.url}") if response.status in (401, 403) else None)
            page.fill("#password", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_selector("#generate", timeout=60_000)
            page.fill("#prompt textarea", "a red circle")
            page.click("#generate")
            page.wait_for_selector("#result img", timeout=60_000)
            # The first image may be a live preview; the entry is saved when the job ends.
            deadline = time.monotonic() + 60
            while site.services.gallery.count() == 0 and time.monotonic() < deadline:
                page.wait_for_timeout(200)
        finally:
            browser.close()

    assert failures == []
    assert outside == []
    entries = site.services.gallery.list("user:alice")
    assert [entry.parameters["prompt"] for entry in entries.entries] == ["a red circle"]
