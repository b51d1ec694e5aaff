"""JSON answers, encoded by msgspec."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

# Decimals (the seed's amounts, app/seed.py) are written as JSON numbers: 49.99.
_ENCODER = msgspec.json.Encoder(decimal_format="number")


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_ENCODER.encode(data),
        status=status,
        content_type="application/json",
        headers=headers,
    )
