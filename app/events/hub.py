"""The per-worker stream reader and its fan-out to this worker's sockets.

One task per worker reads the partitions' event streams ``e{P}`` (app/keys.py) that
its sockets may see, with ONE reader client (never one per socket), and hands each
order event to the sockets that may see it: the owner's and the admin's. Handing
over is a synchronous append to each socket's bounded queue, so a slow socket can
never stall the reader or the other sockets.

The reader follows a partition while a socket may see it: a customer's socket its
own partition, an admin's all 128. It keeps a position per followed partition (the
last entry id read) and reads on from it after a Redis outage, so a reconnect loses
nothing; if a stream lost entries after its position meanwhile (trimmed), the
sockets that see it are sent a ``resync`` message.

While no socket is subscribed the reader idles: no read, nothing parsed. A socket
needing a partition nobody follows asks for that stream's end (XINFO, on the app's
client) and the reader follows it from there, which is the position that socket is
given, so nothing after it is missed (events before it come from the socket's own
replay). A partition nobody sees any more is dropped at once.

Reading: on one redis-server, one XREAD BLOCK over every followed stream; a socket
needing a new partition wakes it with CLIENT UNBLOCK. On a Redis Cluster, where one
XREAD cannot span slots, the followed streams are read without blocking (pipelined,
a round trip per node) when the doorbell (app/stream_doorbell.py) names them, and all
of them once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterable

import redis.exceptions
from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app import appkeys, keys
from app.events.sockets import CloseCode, EventsConfig, EventSocket, Outgoing
from app.events.stream import (
    PARTITION_OF_STREAM,
    ZERO,
    Cursor,
    StreamId,
    StreamState,
    decode_entry,
    resync_message,
)
from app.redis_clients import redis_client
from app.stream_doorbell import Doorbell

log = logging.getLogger(__name__)

_RETRY_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0)
# On a cluster, every followed stream is read at least this often (seconds).
SWEEP_S = 1.0
# CLIENT UNBLOCK may reach Redis before the XREAD it is meant for: tries, and the
# pause between them (seconds), before leaving it to the XREAD's own timeout.
_UNBLOCK_TRIES = 50
_UNBLOCK_PAUSE = 0.005


class EventHub:
    """This worker's subscribers, indexed by who they are, and the reader feeding them."""

    def __init__(self, redis: Redis | RedisCluster, config: EventsConfig) -> None:
        # May be replaced while running (tests do); a socket keeps the config
        # it was opened with.
        self.config = config
        self._redis = redis  # the reader's own client (one connection on one server)
        self._doorbell = Doorbell(redis) if isinstance(redis, RedisCluster) else None
        self._by_customer: dict[str, set[EventSocket]] = {}
        self._admins: set[EventSocket] = set()
        # Per followed partition, the id of the last entry read (or the stream's end
        # when it was first followed); a partition no socket sees is not in it.
        self.positions: Cursor = {}
        self._seen_by: Counter[int] = Counter()  # partition -> sockets that see it
        # Set while the reader follows some partition; clear while it idles.
        self.ready = asyncio.Event()
        # The followed partitions grew: an idle reader wakes up.
        self._grew = asyncio.Event()
        self._reader_id: int | None = None  # CLIENT ID of the reader's connection
        self._reading: frozenset[int] | None = None  # partitions of the XREAD in flight
        self._read_done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # ---- subscribers
    async def join(self, socket: EventSocket, control: Redis | RedisCluster) -> Cursor:
        """Follow the partitions ``socket`` may see (asking ``control``, the app's
        client, for the end of the streams nobody follows yet), subscribe it, and make
        sure the reader reads them. Returns the reader's positions in them."""
        missing = [p for p in socket.partitions if p not in self.positions]
        if missing:
            ends = await self._ends(control, missing)
            for partition, end in zip(missing, ends, strict=True):
                # A concurrent join may have been first: its position is the reader's.
                self.positions.setdefault(partition, end)
        # No await since the positions were set: the reader cannot have dropped them.
        live_from = self.subscribe(socket)
        if missing:
            await self._wake(control, missing)
        return live_from

    def subscribe(self, socket: EventSocket) -> Cursor:
        """Queue every event read from now on for ``socket``; returns the reader's
        position in each partition it sees: all those events are after it."""
        assert all(p in self.positions for p in socket.partitions), "follow them first"
        socket.on_close = self.unsubscribe
        if socket.principal.is_admin:
            self._admins.add(socket)
        else:
            customer_id = socket.principal.customer_id
            assert customer_id is not None
            self._by_customer.setdefault(customer_id, set()).add(socket)
        self._seen_by.update(socket.partitions)
        return {p: self.positions[p] for p in socket.partitions}

    def unsubscribe(self, socket: EventSocket) -> None:
        if socket.principal.is_admin:
            if socket not in self._admins:
                return
            self._admins.discard(socket)
        else:
            customer_id = socket.principal.customer_id
            assert customer_id is not None
            sockets = self._by_customer.get(customer_id)
            if sockets is None or socket not in sockets:
                return
            sockets.discard(socket)
            if not sockets:
                del self._by_customer[customer_id]
        self._seen_by.subtract(socket.partitions)
        for partition in socket.partitions:
            if self._seen_by[partition] <= 0:
                del self._seen_by[partition]
                self.positions.pop(partition, None)

    @property
    def subscribers(self) -> int:
        return len(self._admins) + sum(len(s) for s in self._by_customer.values())

    def _fan_out(self, partition: int, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        for entry_id, fields in entries:
            event = decode_entry(partition, entry_id, fields)
            if event is None:
                continue
            item = Outgoing(partition, event.id, event.payload)
            for socket in tuple(self._by_customer.get(event.customer_id, ())):
                socket.offer(item)
            for socket in tuple(self._admins):
                socket.offer(item)

    def _broadcast(self, partition: int, payload: bytes) -> None:
        """To every socket that sees ``partition``."""
        item = Outgoing(partition, None, payload)
        for socket in tuple(self._admins):
            socket.offer(item)
        for sockets in tuple(self._by_customer.values()):
            for socket in tuple(sockets):
                if partition in socket.partitions:
                    socket.offer(item)

    async def _ends(self, client: Redis | RedisCluster, partitions: list[int]) -> list[StreamId]:
        """Where each partition's stream ends now (0-0 when it does not exist yet)."""
        states = await self._states(client, partitions)
        return [state.last_generated for state in states]

    @staticmethod
    async def _states(client: Redis | RedisCluster, partitions: Iterable[int]) -> list[StreamState]:
        async with client.pipeline(transaction=False) as pipe:
            for partition in partitions:
                pipe.xinfo_stream(keys.events(partition))
            replies = await pipe.execute(raise_on_error=False)
        return [StreamState.from_xinfo(reply) for reply in replies]

    async def _wake(self, control: Redis | RedisCluster, partitions: list[int]) -> None:
        """Make the reader read ``partitions`` now rather than after its current wait."""
        self._grew.set()
        if self._doorbell is not None:
            for partition in partitions:
                self._doorbell.ring(partition)
            return
        wanted = set(partitions)
        for _ in range(_UNBLOCK_TRIES):
            reading, reader_id = self._reading, self._reader_id
            if reading is None or wanted <= reading or reader_id is None:
                return  # not blocked, or already reading them: the next read has them
            if await control.client_unblock(reader_id):
                return
            # The XREAD was sent but has not reached Redis yet; or it just returned.
            self._read_done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._read_done.wait(), _UNBLOCK_PAUSE)

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
        if self._doorbell is not None:
            await self._doorbell.stop()
        if not task.cancelled() and task.exception() is not None:
            log.error("events reader ended with an error", exc_info=task.exception())

    async def _run(self) -> None:
        failures = 0
        next_sweep = 0.0
        while not self._stopping:
            try:
                if not self.positions:
                    self.ready.clear()
                    self._grew.clear()
                    if self._doorbell is not None:
                        await self._doorbell.stop()
                    await self._grew.wait()
                    if self._doorbell is not None:
                        self._doorbell.start()
                    continue
                self.ready.set()
                if failures:
                    await self._check_after_outage()
                failures = 0
                if self._doorbell is None:
                    await self._read_blocking()
                    continue
                loop = asyncio.get_running_loop()
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + SWEEP_S
                    self._doorbell.take()
                    wanted = list(self.positions)
                else:
                    wanted = [p for p in self._doorbell.take() if p in self.positions]
                if not wanted:
                    await self._doorbell.wait(max(0.0, next_sweep - loop.time()))
                    continue
                await self._read_each(wanted)
            except (redis.exceptions.RedisError, OSError) as error:
                self._reader_id = None
                delay = _RETRY_DELAYS[min(failures, len(_RETRY_DELAYS) - 1)]
                failures += 1
                if failures == 1:
                    log.warning("events reader: %s; retrying", error.__class__.__name__)
                await asyncio.sleep(delay)
            except Exception:
                log.exception("events reader failed; retrying")
                self._reader_id = None
                failures += 1
                await asyncio.sleep(_RETRY_DELAYS[-1])

    async def _read_blocking(self) -> None:
        """One redis-server: one XREAD BLOCK over every followed stream."""
        if self._reader_id is None:
            self._reader_id = await self._redis.client_id()
        streams = {keys.events(p): str(at) for p, at in self.positions.items()}
        self._reading = frozenset(self.positions)
        try:
            reply = await self._redis.xread(
                streams, count=self.config.read_count, block=self.config.read_block_ms
            )
        finally:
            self._reading = None
            self._read_done.set()
        for stream, entries in reply or ():
            self._take(PARTITION_OF_STREAM[stream], entries)

    async def _read_each(self, partitions: list[int]) -> None:
        """A cluster: each stream without blocking, in one pipeline (split per node)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for partition in partitions:
                pipe.xread(
                    {keys.events(partition): str(self.positions[partition])},
                    count=self.config.read_count,
                )
            replies = await pipe.execute()
        for partition, reply in zip(partitions, replies, strict=True):
            for _stream, entries in reply or ():
                self._take(partition, entries)
                if len(entries) >= self.config.read_count and self._doorbell is not None:
                    self._doorbell.ring(partition)  # more may follow

    def _take(self, partition: int, entries: list) -> None:
        if not entries or partition not in self.positions:
            return  # nobody sees this partition any more
        last = StreamId.parse(entries[-1][0])
        if last is not None:
            self.positions[partition] = max(self.positions[partition], last)
        self._fan_out(partition, entries)

    async def _check_after_outage(self) -> None:
        """After a Redis outage: did a followed stream lose entries we had not read yet?"""
        partitions = list(self.positions)
        states = await self._states(self._redis, partitions)
        for partition, state in zip(partitions, states, strict=True):
            position = self.positions.get(partition)
            if position is None:
                continue  # dropped meanwhile
            if state.unknown(position):
                # The stream is gone or was recreated (a restore, a FLUSHALL): start over.
                lost_from, self.positions[partition] = position, ZERO
                reason = "unknown_id"
            elif state.lost_after(position):
                lost_from, reason = position, "trimmed"
            else:
                continue
            log.warning(
                "events reader: entries of partition %d after %s are gone (%s)",
                partition,
                lost_from,
                reason,
            )
            self._broadcast(
                partition,
                resync_message(
                    reason,
                    partition,
                    lost_from,
                    state,
                    "events may have been lost while the event store was unreachable: "
                    "reload state with GET /orders",
                ),
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
