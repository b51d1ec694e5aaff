"""Liveness, readiness and the bench-only routes."""

from __future__ import annotations

import asyncio

from aiohttp import web

from app import appkeys
from app.query import query_int
from app.responses import json_response
from app.routing import Call
from app.scripts import Scripts


async def healthz(call: Call[None]) -> web.Response:
    return json_response({"status": "ok"})


class Readiness:
    """/readyz's answer, checked against Redis at most once per ``ttl`` seconds.

    The probe is unauthenticated and exempt from the in-flight cap, so without
    this every caller would cost Redis a SCRIPT EXISTS. A good answer is reused
    while the hot-path connection that gave it stays up (a dropped connection
    is news at once); a bad one is not, so recovery shows at once too, and it
    costs Redis nothing. Concurrent probes share the one check in flight.
    """

    def __init__(self, ttl: float = 1.0) -> None:
        self.ttl = ttl
        self._good_at = float("-inf")  # loop time of the last good check
        self._good_on: object | None = None
        self._checking: asyncio.Task[None] | None = None

    def _still_good(self, scripts: Scripts) -> bool:
        connection = scripts.connection
        fresh = asyncio.get_running_loop().time() < self._good_at + self.ttl
        return fresh and connection is self._good_on

    async def check(self, scripts: Scripts) -> None:
        """Return when ready; raise the Redis error that says why not."""
        if self._still_good(scripts):
            return
        if self._checking is None:
            self._checking = asyncio.ensure_future(self._check(scripts))
            self._checking.add_done_callback(self._checked)
        # A probe that hangs up must not cancel the check the others wait for.
        await asyncio.shield(self._checking)

    async def _check(self, scripts: Scripts) -> None:
        if not await scripts.loaded():
            # Redis restarted without its script cache (or was flushed): load again.
            await scripts.load()
        self._good_on = scripts.connection
        self._good_at = asyncio.get_running_loop().time()

    def _checked(self, task: asyncio.Task[None]) -> None:
        self._checking = None
        if not task.cancelled():
            task.exception()  # retrieved, even when every probe waiting on it hung up


async def readyz(call: Call[None]) -> web.Response:
    """Ready means Redis answers on the hot-path connection and every script is loaded."""
    request = call.request
    await request.app[appkeys.READINESS].check(request.app[appkeys.SCRIPTS])
    return json_response({"status": "ready"})


async def bench_hello(call: Call[None]) -> web.Response:
    """The bench's ceiling: the cheapest JSON answer this stack can give."""
    return json_response({"hello": "world"})


async def bench_sleep(call: Call[None]) -> web.Response:
    """A slow in-flight request for the graceful-shutdown and in-flight-cap tests."""
    ms = query_int(call.request, "ms", 100, 0, 10_000)
    await asyncio.sleep(ms / 1000)
    return json_response({"slept_ms": ms})
