"""Liveness, readiness and the bench-only routes."""

from __future__ import annotations

import asyncio

from aiohttp import web

from app import appkeys
from app.models import json_response, query_int


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready means Redis answers and every script is loaded there."""
    scripts = request.app[appkeys.SCRIPTS]
    if not await scripts.loaded():
        # Redis restarted without its script cache (or was flushed): load again.
        await scripts.load()
    return json_response({"status": "ready"})


async def bench_hello(request: web.Request) -> web.Response:
    """The bench's ceiling: the cheapest JSON answer this stack can give."""
    return json_response({"hello": "world"})


async def bench_sleep(request: web.Request) -> web.Response:
    """A slow in-flight request for the graceful-shutdown and in-flight-cap tests."""
    ms = query_int(request, "ms", 100, 0, 10_000)
    await asyncio.sleep(ms / 1000)
    return json_response({"slept_ms": ms})
