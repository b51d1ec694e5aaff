"""The HTML pages: ``GET /live`` (your orders changing state, over the
WebSocket) and ``GET /docs`` (Swagger UI over /openapi.json).

Each page is one file in ``app/static``, served with a Content-Security-Policy
that allows its inline scripts by hash and loads nothing from outside the shop.
Swagger UI's files come from the ``swagger-ui-bundle-v2`` package (the
``swagger_ui_bundle`` module), never from a CDN.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources
from pathlib import Path

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

from app.routing import Call

_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)
_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_COMMON_POLICY = "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
# What each page may load besides its own inline scripts: /live only connects
# (the WebSocket, GET /orders); Swagger UI also loads its bundle, stylesheet and
# icon from /docs/..., and draws with inline styles and data: images.
_POLICIES = {
    "live.html": "default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
    "connect-src 'self'",
    "docs.html": "default-src 'none'; script-src 'self' {hashes}; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'",
}
# The only Swagger UI files served, under /docs/<name>.
DOCS_ASSETS = frozenset(
    {"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "favicon-16x16.png"}
)
# Only on that name pattern does /docs/{id} match a route at all (app/routes.py).
DOCS_ASSET_PATTERN = r"^[a-z0-9-]{1,40}\.(?:js|css|png)$"


@cache
def _page(name: str) -> tuple[bytes, str]:
    """The page and its Content-Security-Policy."""
    html = resources.files("app").joinpath("static", name).read_text()
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in _SCRIPT.findall(html)
    )
    policy = _POLICIES[name].format(hashes=hashes) + "; " + _COMMON_POLICY
    return html.encode(), policy


def _html(name: str) -> web.Response:
    body, policy = _page(name)
    return web.Response(
        body=body,
        content_type="text/html",
        charset="utf-8",
        headers={**_HEADERS, "Content-Security-Policy": policy, "Cache-Control": "no-cache"},
    )


async def live_page(call: Call[None]) -> web.Response:
    return _html("live.html")


async def docs_page(call: Call[None]) -> web.Response:
    return _html("docs.html")


async def docs_asset(call: Call[None]) -> web.StreamResponse:
    name = call.id
    if name not in DOCS_ASSETS:
        raise web.HTTPNotFound()
    # The package's files change only with its version: let browsers keep them a day.
    return web.FileResponse(
        Path(str(swagger_ui_path)) / name,
        headers={**_HEADERS, "Cache-Control": "public, max-age=86400"},
    )
