"""The API docs pages (/docs, /redoc) load Swagger UI and ReDoc from the service itself, never from a CDN.

A gateway with the built-in reference teacher serves the pages on 127.0.0.1. The browser test renders
them in Debian's Chromium with every request to another host aborted, as on a network without internet
access, and skips with the reason where Chromium or playwright is missing.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from gateway_helpers import gateway
from test_student_page import CHROMIUM, CHROMIUM_ARGS, needs_browser, sync_playwright

from shared.api_docs import ASSETS_PATH
from shared.api_keys import hash_key

DOC_PAGES = ("/docs", "/redoc")
LAB_KEY = "docs-test-key-0123456789abcdef"
# Every src and href attribute of a page, and the URLs a page passes to Swagger UI or ReDoc in a script.
ATTRIBUTE_URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
SCRIPT_URL = re.compile(r"""(?:url:\s*|spec-url=)["']([^"']+)["']""")
RENDER_TIMEOUT_MS = 60_000
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


def page_urls(html: str) -> list[str]:
    return ATTRIBUTE_URL.findall(html) + SCRIPT_URL.findall(html)


@pytest.mark.parametrize("page", DOC_PAGES)
def test_docs_page_loads_only_local_files(tmp_path, page):
    with gateway(tmp_path / "cache") as http:
        html = http.get(page)
        urls = page_urls(html.text)
        fetched = {url: http.get(url) for url in urls}

    assert html.status_code == 200, html.text
    assert urls, html.text
    for url in urls:
        assert not urlsplit(url).netloc, f"{page} loads {url} from another host"
        assert fetched[url].status_code == 200, url
    scripts = [url for url in urls if url.endswith(".js")]
    assert scripts and all(url.startswith(ASSETS_PATH + "/") for url in scripts)
    # The bundles are the real libraries, not empty placeholders.
    assert all(len(fetched[url].content) > 100_000 for url in scripts)
    assert "/openapi.json" in urls


def test_docs_assets_public_when_pages_need_key(tmp_path):
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(f"[[keys]]\nname = 'lab-a'\nsha256 = '{hash_key(LAB_KEY)}'\n")

    with gateway(tmp_path / "cache", keys_file=keys_file) as http:
        page = http.get("/docs")
        asset = http.get(f"{ASSETS_PATH}/swagger-ui-bundle.js")
    with gateway(tmp_path / "off", api_docs="off") as http:
        off = http.get(f"{ASSETS_PATH}/swagger-ui-bundle.js")

    assert page.status_code == 401
    # The library files hold nothing of the service, so they need no key.
    assert asset.status_code == 200
    assert off.status_code == 404


@needs_browser
@pytest.mark.parametrize("page, rendered", [("/docs", ".opblock-summary-path[data-path='/v1/embeddings']"), ("/redoc", "h1")])
def test_docs_page_renders_offline(tmp_path, page, rendered):
    aborted: list[str] = []
    failed: list[str] = []

    def only_local(route):
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            aborted.append(route.request.url)
            route.abort()

    with gateway(tmp_path / "cache") as http, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            browser_page = context.new_page()
            browser_page.route("**/*", only_local)
            browser_page.on("requestfailed", lambda request: failed.append(request.url))
            browser_page.goto(str(http.base_url.join(page)))
            element = browser_page.wait_for_selector(rendered, timeout=RENDER_TIMEOUT_MS)
            text = element.inner_text()
        finally:
            context.close()

    # ReDoc's "API docs by Redocly" footer loads its logo from cdn.redoc.ly; offline only that image is missing.
    assert [url for url in aborted if url != REDOC_LOGO] == []
    assert [url for url in failed if url != REDOC_LOGO] == []
    assert text
