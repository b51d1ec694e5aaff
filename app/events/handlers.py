"""``GET /orders/events``: the WebSocket of live order events (the page using it,
``GET /live``, is in app/pages.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from aiohttp import web
from redis.exceptions import RedisError

from app import appkeys
from app.auth import BEARER_PROTOCOL
from app.events.sockets import CloseCode, EventSocket
from app.events.stream import Cursor, StreamId, parse_last_id
from app.problems import ProblemError, retry_later
from app.routing import Call

# Clients only ever send control frames (pong, close); keep their messages tiny.
MAX_CLIENT_MESSAGE = 4096


async def orders_events(call: Call[None]) -> web.StreamResponse:
    # The route (websocket=True) took the token from the header or the subprotocol.
    request, principal = call.request, call.principal
    resume_from = _last_id(request)
    hub = request.app[appkeys.EVENT_HUB]
    config = hub.config
    ws = web.WebSocketResponse(
        heartbeat=config.heartbeat,
        protocols=(BEARER_PROTOCOL,),
        # Events are ~250 bytes: per-socket deflate would cost CPU on every
        # message of the fan-out for little.
        compress=False,
        max_msg_size=MAX_CLIENT_MESSAGE,
        timeout=config.close_timeout,
    )
    if not ws.can_prepare(request).ok:
        raise web.HTTPUpgradeRequired(reason="This endpoint is a WebSocket: send an upgrade")
    sockets = request.app[appkeys.EVENT_SOCKETS]
    if len(sockets) >= config.max_sockets:
        raise retry_later("overloaded", 5, "This worker holds as many event sockets as it may")
    socket = EventSocket(ws, request, principal, config)
    try:
        async with asyncio.timeout(request.app[appkeys.SETTINGS].redis_timeout):
            # Before the upgrade and before any replay read.
            live_from = await hub.join(socket, request.app[appkeys.REDIS])
    except (TimeoutError, RedisError, OSError):
        hub.unsubscribe(socket)
        raise retry_later("service_unavailable", 1, "The event stream is not readable") from None
    sockets.add(socket)
    try:
        await ws.prepare(request)
        socket.start(request.app[appkeys.REDIS], resume_from, live_from)
        with _not_in_flight(request):
            # Clients send nothing but control frames, which aiohttp answers
            # (pong) or acts on (close); this ends when the socket is closed by
            # either side.
            async for _message in ws:
                pass
    finally:
        hub.unsubscribe(socket)
        sockets.discard(socket)
        await socket.close(CloseCode.NORMAL)
    return ws


def _last_id(request: web.Request) -> Cursor | StreamId | None:
    raw = request.query.get("last_id")
    if raw is None:
        return None
    resume_from = parse_last_id(raw)
    if resume_from is None:
        raise ProblemError(
            "validation_error",
            "last_id must be the live message's last_id, or an event's id "
            "<partition>.<ms>-<seq> (several joined by commas, one per partition), "
            "or one stream id <ms>-<seq> for every partition",
        )
    return resume_from


@contextlib.contextmanager
def _not_in_flight(request: web.Request) -> Iterator[None]:
    """An upgraded socket is no request in flight: it may stay open for hours and
    must not use up the worker's MAX_INFLIGHT slots (its own cap is
    EventsConfig.max_sockets). The in-flight middleware counted the upgrade
    request; give the slot back while the socket is open."""
    gauge = request.app[appkeys.INFLIGHT]
    gauge.current -= 1
    try:
        yield
    finally:
        gauge.current += 1
