"""The per-worker stream reader and its fan-out to this worker's sockets.

One task per worker XREADs ``events`` with BLOCK on ONE dedicated Redis
connection (never one per client) and hands each order event to the sockets
that may see it: the owner's and the admin's. Handing over is a synchronous
append to each socket's bounded queue, so a slow socket can never stall the
reader or the other sockets.

The reader keeps its own position (the last entry id it read) and reads on
from it after a Redis outage, so a reconnect loses nothing; if the stream lost
entries after that position meanwhile (trimmed), every socket is sent a
``resync`` message.

While no socket is subscribed the reader idles: no XREAD, nothing parsed (a
worker without sockets used to read every event for nobody). A socket joining
wakes it; it starts again from the stream's end as of then, which is the
position that socket is given, so nothing after it is missed (events before it
come from the socket's own replay).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import redis.exceptions
from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app import appkeys, keys
from app.events.sockets import CloseCode, EventsConfig, EventSocket, Outgoing
from app.events.stream import ZERO, StreamId, StreamState, decode_entry, resync_message
from app.redis_clients import redis_client

log = logging.getLogger(__name__)

_RETRY_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0)


class EventHub:
    """This worker's subscribers, indexed by who they are, and the reader feeding them."""

    def __init__(self, redis: Redis, config: EventsConfig) -> None:
        # May be replaced while running (tests do); a socket keeps the config
        # it was opened with.
        self.config = config
        self._redis = redis  # the dedicated reader connection
        self._by_customer: dict[str, set[EventSocket]] = {}
        self._admins: set[EventSocket] = set()
        # The id of the last entry read; None until the first XINFO answered.
        self.position: StreamId | None = None
        # Set while the reader reads for subscribers from a current position;
        # clear while it idles or is waking up.
        self.ready = asyncio.Event()
        # A socket wants to join: wake the idle reader.
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # ---- subscribers
    async def join(self, socket: EventSocket) -> StreamId:
        """Wake the reader if it idles, then subscribe ``socket`` (see subscribe)."""
        while not self.ready.is_set():
            self._wanted.set()
            await self.ready.wait()
        # No await since ready was seen set: the reader cannot have gone idle
        # (and moved its position on) in between.
        return self.subscribe(socket)

    def subscribe(self, socket: EventSocket) -> StreamId:
        """Queue every event read from now on for ``socket``; returns the reader's
        position: all those events are after it."""
        assert self.position is not None and self.ready.is_set(), "subscribe only once ready"
        socket.on_close = self.unsubscribe
        if socket.principal.is_admin:
            self._admins.add(socket)
        else:
            customer_id = socket.principal.customer_id
            assert customer_id is not None
            self._by_customer.setdefault(customer_id, set()).add(socket)
        return self.position

    def unsubscribe(self, socket: EventSocket) -> None:
        if socket.principal.is_admin:
            self._admins.discard(socket)
            return
        customer_id = socket.principal.customer_id
        assert customer_id is not None
        sockets = self._by_customer.get(customer_id)
        if sockets is not None:
            sockets.discard(socket)
            if not sockets:
                del self._by_customer[customer_id]

    @property
    def subscribers(self) -> int:
        return len(self._admins) + sum(len(s) for s in self._by_customer.values())

    def _fan_out(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        for entry_id, fields in entries:
            event = decode_entry(entry_id, fields)
            if event is None:
                continue
            item = Outgoing(event.id, event.payload)
            for socket in tuple(self._by_customer.get(event.customer_id, ())):
                socket.offer(item)
            for socket in tuple(self._admins):
                socket.offer(item)

    def _broadcast(self, payload: bytes) -> None:
        item = Outgoing(None, payload)
        for socket in tuple(self._admins):
            socket.offer(item)
        for sockets in tuple(self._by_customer.values()):
            for socket in tuple(sockets):
                socket.offer(item)

    # ---- the reader
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="events-reader")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        # Cancel until it is done: redis-py can swallow a cancel that lands
        # while it checks a fresh connection (an asyncio.timeout(0) inside it
        # turns the CancelledError into its own TimeoutError), and the loop
        # would then carry on into a blocking XREAD.
        while not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=0.1)
        if not task.cancelled() and task.exception() is not None:
            log.error("events reader ended with an error", exc_info=task.exception())

    async def _state(self) -> StreamState:
        try:
            info = await self._redis.xinfo_stream(keys.EVENTS)
        except redis.exceptions.ResponseError as error:
            return StreamState.from_xinfo(error)
        return StreamState.from_xinfo(info)

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                if not self.subscribers and not self._wanted.is_set():
                    self.ready.clear()  # from here on a joining socket must wake us
                    await self._wanted.wait()
                if not self.ready.is_set():
                    # Nobody listened until now: start from the stream's end.
                    self.position = (await self._state()).last_generated
                    self.ready.set()
                    self._wanted.clear()
                elif failures:
                    await self._check_after_outage()
                failures = 0
                reply = await self._redis.xread(
                    {keys.EVENTS: str(self.position)},
                    count=self.config.read_count,
                    block=self.config.read_block_ms,
                )
                for _stream, entries in reply or ():
                    if entries:
                        self.position = StreamId.parse(entries[-1][0]) or self.position
                        self._fan_out(entries)
            except (redis.exceptions.RedisError, OSError) as error:
                delay = _RETRY_DELAYS[min(failures, len(_RETRY_DELAYS) - 1)]
                failures += 1
                if failures == 1:
                    log.warning("events reader: %s; retrying", error.__class__.__name__)
                await asyncio.sleep(delay)
            except Exception:
                log.exception("events reader failed; retrying")
                failures += 1
                await asyncio.sleep(_RETRY_DELAYS[-1])

    async def _check_after_outage(self) -> None:
        """After a Redis outage: did the stream lose entries we had not read yet?"""
        assert self.position is not None
        state = await self._state()
        if state.unknown(self.position):
            # The stream is gone or was recreated (a restore, a FLUSHALL): start over.
            lost_from, self.position = self.position, ZERO
            reason = "unknown_id"
        elif state.lost_after(self.position):
            lost_from, reason = self.position, "trimmed"
        else:
            return
        log.warning("events reader: entries after %s are gone (%s)", lost_from, reason)
        self._broadcast(
            resync_message(
                reason,
                lost_from,
                state,
                "events may have been lost while the event store was unreachable: "
                "reload state with GET /orders",
            )
        )


async def events_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: this worker's stream reader, on its own Redis connection."""
    settings = app[appkeys.SETTINGS]
    config = EventsConfig()
    reader = redis_client(
        settings.redis_url,
        settings.redis_cluster_nodes,
        single_connection_client=True,
        # A blocked XREAD answers within read_block_ms; give it that much more.
        socket_timeout=config.read_block_ms / 1000 + settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        retry=Retry(NoBackoff(), 0),
    )
    hub = EventHub(reader, config)
    app[appkeys.EVENT_HUB] = hub
    app[appkeys.EVENT_SOCKETS] = set()
    hub.start()
    yield
    await hub.stop()
    await reader.aclose()


async def close_event_sockets(app: web.Application) -> None:
    """on_shutdown: close every socket with GOING_AWAY before the worker exits."""
    sockets = app[appkeys.EVENT_SOCKETS]
    closing = [socket.close(CloseCode.GOING_AWAY, b"server shutdown") for socket in sockets]
    if closing:
        await asyncio.gather(*closing, return_exceptions=True)
