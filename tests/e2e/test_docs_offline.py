"""``/docs`` and ``/redoc`` in a real headless browser with no network but loopback:
Debian's chromium, driven by Playwright (its own browser builds are never downloaded).

Every request the page makes to anything but the server under test is refused twice
over (the browser resolves no host name but 127.0.0.1, and the test aborts and records
any other request), and none may be attempted: the page must render Swagger UI's
operation list for our API (and ReDoc its operations) from the app's own assets. (ReDoc
alone asks for its decorative logo, and hides it when that fails.)"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Browser, Page, Route, async_playwright

CHROMIUM = "/usr/bin/chromium"
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
VMIGRATE = str(Path(sys.executable).parent / "vmigrate")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


@pytest.fixture(scope="module")
def server(database_url: str) -> Iterator[str]:
    """``vmigrate serve --no-worker`` on a free loopback port, on the test database."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    data = Path(tempfile.mkdtemp(prefix="vmigrate-docs-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMIGRATE_")}
    env.update(VMIGRATE_DATA_DIR=str(data), VMIGRATE_DATABASE_URL=database_url,
               VMIGRATE_LOG_FORMAT="json")
    log = data / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([VMIGRATE, "serve", "--no-worker", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    # launch() gives the browser a fresh temporary profile of its own (Playwright
    # refuses --user-data-dir here) and removes it on close.
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                            args=FLAGS)
        try:
            yield chromium
        finally:
            await chromium.close()


async def _offline_page(browser: Browser, base: str) -> tuple[Page, list[str]]:
    context = await browser.new_context()
    page = await context.new_page()
    refused: list[str] = []
    ours = urlsplit(base).netloc

    async def only_loopback(route: Route) -> None:
        url = route.request.url
        if urlsplit(url).netloc == ours or url.startswith("data:"):
            await route.continue_()
        else:
            refused.append(url)
            await route.abort("internetdisconnected")

    await page.route("**/*", only_loopback)
    return page, refused


async def test_swagger_ui_renders_offline(browser: Browser, server: str) -> None:
    spec = httpx.get(f"{server}/openapi.json", timeout=10).json()
    operations = sum(1 for item in spec["paths"].values() for method in item
                     if method in ("get", "post", "put", "patch", "delete"))
    page, refused = await _offline_page(browser, server)
    await page.goto(f"{server}/docs", wait_until="load")
    await page.wait_for_selector(".opblock", timeout=30_000)
    rendered = await page.locator(".opblock").count()
    assert rendered == operations
    paths = await page.locator(".opblock-summary-path").all_inner_texts()
    assert any(p.startswith("/v1/migrations") for p in paths), paths
    assert "/metrics" in [p.strip() for p in paths]
    title = await page.locator(".information-container .title").inner_text()
    assert title.startswith("vmigrate")
    assert refused == []


async def test_redoc_renders_offline(browser: Browser, server: str) -> None:
    page, refused = await _offline_page(browser, server)
    await page.goto(f"{server}/redoc", wait_until="load")
    await page.wait_for_selector("[data-section-id^='operation/']", timeout=30_000)
    sections = await page.locator("[data-section-id^='operation/']").count()
    assert sections > 10
    # ReDoc's bundle has one remote reference: the "Redocly" logo beside its
    # "API docs by Redocly" link, an <img> that removes itself when it cannot load.
    assert set(refused) <= {REDOC_LOGO}
    assert await page.locator("img[alt='redocly logo']").count() == 0


async def test_only_the_shipped_assets_are_served(server: str) -> None:
    ok = httpx.get(f"{server}/docs/assets/swagger-ui.css", timeout=10)
    assert ok.status_code == 200
    assert ok.headers["content-type"].startswith("text/css")
    for name in ("..%2Fcore.py", "core.py", "%2Fetc%2Fpasswd"):
        assert httpx.get(f"{server}/docs/assets/{name}", timeout=10).status_code in (404, 422)
