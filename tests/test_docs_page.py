"""Issue 14 item 5: ``GET /docs`` is Swagger UI from a Python package, served by
the shop itself. In headless Chromium (Debian's, as for /live) through nginx:
every request the page makes goes to the shop, and it renders every operation
of /openapi.json."""

from __future__ import annotations

import shutil
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from app.pages import DOCS_ASSETS
from loadtests.support.stack import FullStack
from tests.helpers import CHROMIUM, CHROMIUM_ARGS

DEADLINE_MS = 30_000


async def test_docs_page_and_its_assets_are_served_by_the_app(client: TestClient) -> None:
    page = await client.get("/docs")
    assert page.status == 200
    assert page.content_type == "text/html"
    html = await page.text()
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
    assert "script-src 'self' 'sha256-" in policy
    assert "http" not in policy  # no other origin is allowed anything
    assert "//" not in html.replace("// ", "")  # no absolute URL in the page
    for name in sorted(DOCS_ASSETS):
        asset = await client.get(f"/docs/{name}")
        assert asset.status == 200, name
        assert len(await asset.read()) > 0
    bundle = await client.get("/docs/swagger-ui-bundle.js")
    assert bundle.content_type in {"text/javascript", "application/javascript"}
    # Only the listed files: the package's other files and any other name are 404.
    for name in ("index.html", "swagger-initializer.js", "swagger-ui.js.map", "..%2fx.js"):
        assert (await client.get(f"/docs/{name}")).status == 404, name


async def test_docs_page_is_left_out_of_the_spec(client: TestClient) -> None:
    spec = await (await client.get("/openapi.json")).json()
    assert not any(path.startswith("/docs") for path in spec["paths"])
    assert "/live" in spec["info"]["description"]


@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="chromium: run `make setup`")
async def test_docs_page_renders_every_operation_and_loads_only_from_the_shop(
    full_stack: FullStack,
) -> None:
    from playwright.async_api import async_playwright, expect

    async with aiohttp.ClientSession() as http:
        spec = await (await http.get(f"{full_stack.http_url}/openapi.json")).json()
    operations = [(method.upper(), path) for path, item in spec["paths"].items() for method in item]
    shop = urlsplit(full_stack.http_url)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            requested: list[str] = []
            errors: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on(
                "console",
                lambda message: errors.append(message.text) if message.type == "error" else None,
            )
            await page.goto(f"{full_stack.http_url}/docs")
            blocks = page.locator(".opblock")
            await expect(blocks).to_have_count(len(operations), timeout=DEADLINE_MS)
            for method, path in operations:
                block = page.locator(f".opblock-{method.lower()}").filter(
                    has=page.locator(f'.opblock-summary-path[data-path="{path}"]')
                )
                await expect(block).to_have_count(1)
            # The document's own description, rendered, links to the live page.
            await expect(page.locator('.info a[href="/live"]')).to_have_count(1)
            await expect(page.locator("#live-link")).to_have_attribute("href", "/live")
            # Try it out: Swagger UI calls the shop through the spec's relative
            # servers entry (issue 18 item 6) and shows the answer.
            phones = page.locator("#operations-default-get_phones")
            await phones.locator(".opblock-summary").click()
            await phones.locator(".try-out__btn").click()
            await phones.locator(".execute").click()
            status = phones.locator(".live-responses-table td.response-col_status:not(.col_header)")
            await expect(status).to_have_text("200", timeout=DEADLINE_MS)
            await page.wait_for_load_state("networkidle")
        finally:
            await browser.close()
    assert f"{full_stack.http_url}/openapi.json" in requested
    assert f"{full_stack.http_url}/docs/swagger-ui-bundle.js" in requested
    assert f"{full_stack.http_url}/phones" in requested  # the Try it out call
    for url in requested:
        parts = urlsplit(url)
        if parts.scheme == "data":
            continue  # inline images, part of the page itself
        assert (parts.scheme, parts.netloc) == (shop.scheme, shop.netloc), url
    assert errors == []  # no CSP refusal, nothing failed
