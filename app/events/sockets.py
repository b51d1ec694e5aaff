"""One client's WebSocket: its bounded queue, the task that replays then sends
live events, and the one way it gets closed.

Handover from replay to live, with no gap and no duplicate, per partition (a
customer's socket sees its own partition's stream, the admin's all 128; ids:
app/events/stream.py):

1. the socket is subscribed to the hub (``EventHub.join``, which makes the reader
   follow the socket's partitions) BEFORE anything is read from Redis: from then
   on every event the worker's reader fans out lands in this socket's queue. The
   hub answers with its reader position R0[p] in each partition; everything
   queued from now on is after it;
2. the replay reads each partition's stream with XRANGE from the client's
   ``last_id`` for it (exclusive) to its current end E[p], page by page.
   E[p] >= R0[p], so replay and queue overlap and nothing falls between them;
3. every message carries its partition and stream id and the socket keeps a
   cursor per partition, the highest id it sent. Queued events at or below it
   (already replayed) are dropped; nothing of a partition is ever sent out of
   order or twice. (Events of different partitions have no order among them.)

A client without ``last_id`` starts at R0: it gets what happens after it
connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import redis.exceptions
from aiohttp import WSMsgType, web
from redis.asyncio import Redis

from app import keys
from app.auth import Principal
from app.events.stream import (
    ZERO,
    Cursor,
    OrderEvent,
    StreamId,
    StreamState,
    decode_entry,
    live_message,
    resync_message,
)
from app.partitions import PARTITIONS, partition_of

log = logging.getLogger(__name__)


class CloseCode(IntEnum):
    """Close codes the server sends (RFC 6455 section 7.4; 4000-4999 are ours)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # this worker is shutting down: reconnect (nginx picks a live one)
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # Redis did not answer during the replay: reconnect with last_id
    SLOW_CONSUMER = 4008  # the client fell more than client_buffer events behind


@dataclass(frozen=True)
class EventsConfig:
    """Tunables of the event fan-out, per worker."""

    # Seconds between pings. nginx's proxy_read_timeout for /orders/events (1h)
    # must stay longer, and so must any idle timeout between client and nginx.
    # A client that does not answer a ping within half of this is dropped.
    heartbeat: float = 25.0
    # Events waiting in the worker for one socket once its kernel and transport
    # buffers are full. Past it the socket is closed with SLOW_CONSUMER.
    client_buffer: int = 1000
    # Open sockets per worker; past it the upgrade gets 503.
    max_sockets: int = 5000
    # Seconds a close waits for the client's close frame.
    close_timeout: float = 1.0
    # Seconds after a close before a peer that still reads nothing is reset,
    # releasing what was buffered for it (up to the kernel's socket buffers,
    # a few MB). A slow reader that drains it in time sees the close code.
    abort_after: float = 30.0
    # The stream reader: XREAD BLOCK this long, this many entries at most.
    read_block_ms: int = 5000
    read_count: int = 500
    # XRANGE page size of a replay.
    replay_page: int = 500
    # Stream entries one replay reads at most (over all its partitions), whoever's
    # they are (a customer's events are scattered among its partition's). A client further behind is sent
    # a resync and continues live: reconnecting with an old last_id cannot
    # make the server page through the whole stream.
    replay_max_entries: int = 10_000


class Outgoing:
    """An item of a socket's queue: an event of ``partition``, or a control message
    (id None)."""

    __slots__ = ("id", "partition", "payload")

    def __init__(self, partition: int, id: StreamId | None, payload: bytes) -> None:
        self.partition = partition
        self.id = id
        self.payload = payload


def partitions_seen(principal: Principal) -> tuple[int, ...]:
    """The partitions whose events a socket may see: all for the admin, else the
    customer's own."""
    if principal.is_admin:
        return tuple(range(PARTITIONS))
    assert principal.customer_id is not None
    return (partition_of(principal.customer_id),)


class EventSocket:
    """A connected client: what it may see, what is queued for it, and its tasks."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        request: web.Request,
        principal: Principal,
        config: EventsConfig,
    ) -> None:
        self.ws = ws
        self.request = request
        self.principal = principal
        self.config = config
        self.partitions = partitions_seen(principal)
        self.cursor: Cursor = {}  # per partition, the highest stream id sent
        self.close_code: CloseCode | None = None
        self._queue: deque[Outgoing] = deque()
        self._wakeup = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        # Set by whoever subscribed the socket; called once, when it starts closing.
        self.on_close: Callable[[EventSocket], None] | None = None

    # ---- called by the hub, synchronously: never awaits, so never stalls the fan-out
    def may_see(self, event: OrderEvent) -> bool:
        return self.principal.is_admin or event.customer_id == self.principal.customer_id

    def offer(self, item: Outgoing) -> None:
        if self._closer is not None:
            return
        if len(self._queue) >= self.config.client_buffer:
            log.info("closing a slow event socket: %d events queued", len(self._queue))
            self.close(CloseCode.SLOW_CONSUMER, b"slow consumer: reconnect with last_id")
            return
        self._queue.append(item)
        self._wakeup.set()

    # ---- lifecycle
    def start(self, redis: Redis, resume_from: Cursor | StreamId | None, live_from: Cursor) -> None:
        """Start sending: the replay after ``resume_from`` (if given: a cursor, a
        partition not in it from its start; or one id for every partition), then live
        events."""
        self._sender = asyncio.create_task(self._send(redis, resume_from, live_from))
        self._sender.add_done_callback(self._sender_done)

    def close(self, code: CloseCode, message: bytes = b"") -> asyncio.Task[None]:
        """Close once; every later call returns the same closing task."""
        if self._closer is None:
            self.close_code = code
            if self.on_close is not None:
                self.on_close(self)  # no more events for it, from now on
            self._queue.clear()
            sender = self._sender
            if sender is not None:
                # Stop it here and now: it may be blocked writing to a client
                # that reads nothing, and nothing may be sent after the close.
                sender.cancel()
            self._closer = asyncio.create_task(self._close(sender, code, message))
        return self._closer

    async def _close(
        self, sender: asyncio.Task[None] | None, code: CloseCode, message: bytes
    ) -> None:
        if sender is not None:
            await asyncio.wait([sender])
        ws = self.ws
        if not ws.prepared or ws.closed:
            return
        try:
            async with asyncio.timeout(self.config.close_timeout):
                await ws.close(code=code, message=message)
        except TimeoutError:
            pass  # aiohttp already closed the transport (it flushes what it can)
        finally:
            self._abort_later()

    def _abort_later(self) -> None:
        """A transport.close() waits for buffered data to reach the peer; a peer
        that reads nothing would hold it (and the buffers) forever."""
        transport = self.request.transport
        if transport is not None:
            asyncio.get_running_loop().call_later(self.config.abort_after, transport.abort)

    def _sender_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            return
        if isinstance(error, redis.exceptions.RedisError):
            log.warning("event replay failed: %s", error.__class__.__name__)
            self.close(CloseCode.TRY_AGAIN_LATER, b"event store unavailable: retry with last_id")
        elif isinstance(error, ConnectionError):  # aiohttp's ClientConnectionResetError too
            self.close(CloseCode.NORMAL)  # the client is gone; nothing to tell it
        else:
            log.error("event socket sender failed", exc_info=error)
            self.close(CloseCode.INTERNAL_ERROR)

    # ---- the sender task
    async def _send(
        self, redis: Redis, resume_from: Cursor | StreamId | None, live_from: Cursor
    ) -> None:
        replayed = 0
        if resume_from is None:
            self.cursor = dict(live_from)
        else:
            if isinstance(resume_from, StreamId):
                resume_from = dict.fromkeys(self.partitions, resume_from)
            self.cursor = {p: resume_from.get(p, ZERO) for p in self.partitions}
            budget = self.config.replay_max_entries
            for partition in self.partitions:
                sent, budget = await self._replay(redis, partition, budget, live_from)
                replayed += sent
        await self._write(live_message(self.cursor, replayed))
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            item = self._queue.popleft()
            if item.id is not None:
                if item.id <= self.cursor.get(item.partition, ZERO):
                    continue  # already replayed
                self.cursor[item.partition] = item.id
            await self._write(item.payload)

    async def _replay(
        self, redis: Redis, partition: int, budget: int, live_from: Cursor
    ) -> tuple[int, int]:
        """Send every visible event of ``partition`` after the cursor its stream holds;
        returns (how many, the budget of entries left to read). A resync message comes
        first whenever events after the cursor may be gone. Each page is read with XINFO
        in one MULTI, so the check and the page see the same stream. With the budget
        spent, the cursors skip to where the live queue has everything."""
        stream = keys.events(partition)
        last_id = self.cursor[partition]
        sent = 0
        first_page = True
        reported_loss: StreamId | None = None
        if budget <= 0:  # spent on the partitions before: this one goes on live
            await self._write(
                resync_message(
                    "replay_limit",
                    partition,
                    last_id,
                    StreamState(exists=True),
                    f"more than {self.config.replay_max_entries} stream entries after "
                    "last_id: reload state with GET /orders; events from now on follow",
                )
            )
            # Subscribed before any read: every event after live_from is queued.
            self.cursor[partition] = max(last_id, live_from[partition])
            return sent, budget
        while True:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.xinfo_stream(stream)
                pipe.xrange(
                    stream, min=f"({self.cursor[partition]}", max="+", count=self.config.replay_page
                )
                info, entries = await pipe.execute(raise_on_error=False)
            if isinstance(entries, Exception):
                raise entries
            state = StreamState.from_xinfo(info)
            if first_page and state.unknown(last_id):
                await self._write(
                    resync_message(
                        "unknown_id",
                        partition,
                        last_id,
                        state,
                        "last_id is not from this stream: reload state with GET /orders; "
                        "events from now on follow",
                    )
                )
                self.cursor[partition] = state.last_generated
                first_page = False
                continue
            first_page = False
            cursor = self.cursor[partition]
            if state.lost_after(cursor) and reported_loss != cursor:
                reported_loss = cursor
                await self._write(
                    resync_message(
                        "trimmed",
                        partition,
                        cursor,
                        state,
                        "events after last_id may have been removed from the stream: reload "
                        "state with GET /orders; the events it still holds follow",
                    )
                )
            for entry_id, fields in entries:
                stream_id = StreamId.parse(entry_id)
                if stream_id is None:
                    continue
                self.cursor[partition] = stream_id
                event = decode_entry(partition, entry_id, fields)
                if event is not None and self.may_see(event):
                    await self._write(event.payload)
                    sent += 1
            if len(entries) < self.config.replay_page:
                return sent, budget
            budget -= len(entries)
            if budget <= 0:
                await self._write(
                    resync_message(
                        "replay_limit",
                        partition,
                        self.cursor[partition],
                        state,
                        f"more than {self.config.replay_max_entries} stream entries after "
                        "last_id: reload state with GET /orders; events from now on follow",
                    )
                )
                # Subscribed before this read: every event after the stream's end as
                # of this page is in the live queue, so skip to there.
                self.cursor[partition] = max(self.cursor[partition], state.last_generated)
                return sent, budget

    async def _write(self, payload: bytes) -> None:
        await self.ws.send_frame(payload, WSMsgType.TEXT)


async def close_quietly(socket: EventSocket, code: CloseCode, message: bytes = b"") -> None:
    with contextlib.suppress(Exception):
        await socket.close(code, message)
