"""On a Redis Cluster: which partitions' event streams just got an entry.

Redis cannot block on streams of different slots in one XREAD (redis/redis#6794), so on
a cluster the readers of the 128 streams ``e{P}`` (the mail worker, the WebSocket hub)
read each stream without blocking, and wait for this doorbell between reads: keyspace
notifications of XADD (``notify-keyspace-events`` with ``E`` and ``t``), whose message
is the stream's key. A notification is published only on the node that ran the XADD
(docs/data-tier.md section 8), so the doorbell subscribes on every primary, and again
when the set of primaries changes (a failover, a new node).

A lost notification (a reconnect, a server where CONFIG SET is refused) delays an
entry, never loses it: every reader also sweeps all its streams once a second.
On one redis-server nobody needs this: a blocking XREAD takes all the streams at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from app import keys
from app.partitions import PARTITIONS

log = logging.getLogger(__name__)

CHANNEL = "__keyevent@0__:xadd"
# How often the set of primaries is compared with the cluster client's view.
TOPOLOGY_CHECK_S = 5.0
_STREAM_PARTITION = {keys.events(p): p for p in range(PARTITIONS)}


def with_stream_events(flags: str) -> str:
    """``notify-keyspace-events`` that also publishes keyevent notifications of streams."""
    if "E" not in flags:
        flags += "E"
    if "t" not in flags and "A" not in flags:  # A is every class but key-miss and new
        flags += "t"
    return flags


class Doorbell:
    """The partitions whose stream got an XADD since the last ``take``."""

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster
        self._rung: set[int] = set()
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._warned_config = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stream-doorbell")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def take(self) -> set[int]:
        rung, self._rung = self._rung, set()
        self._event.clear()
        return rung

    def ring(self, partition: int) -> None:
        self._rung.add(partition)
        self._event.set()

    async def wait(self, seconds: float) -> None:
        """Until a stream got an entry, or ``seconds``."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), seconds)

    async def _run(self) -> None:
        while True:
            try:
                await self._serve()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as error:
                log.warning("stream doorbell: %s; subscribing again", error.__class__.__name__)
            except Exception:
                log.exception("stream doorbell failed; subscribing again")
            await asyncio.sleep(1.0)

    async def _serve(self) -> None:
        await self._cluster.initialize()
        primaries = {(n.host, n.port): n for n in self._cluster.get_primaries()}
        clients = []
        try:
            for node in primaries.values():
                options = node.connection_kwargs
                client = Redis(
                    host=node.host,
                    port=node.port,
                    username=options.get("username"),
                    password=options.get("password"),
                    ssl=bool(options.get("ssl")),
                    decode_responses=True,
                )
                clients.append(client)
                await self._enable(client)
            listeners = [asyncio.create_task(self._listen(client)) for client in clients]
            # Entries may have come while nobody listened (before, or between subscriptions).
            for partition in range(PARTITIONS):
                self.ring(partition)
            try:
                while not any(task.done() for task in listeners):
                    await asyncio.sleep(TOPOLOGY_CHECK_S)
                    now = {(n.host, n.port) for n in self._cluster.get_primaries()}
                    if now != primaries.keys():
                        log.info("stream doorbell: the primaries changed; subscribing again")
                        # Entries may have come while nobody listened on the new primary.
                        for partition in range(PARTITIONS):
                            self.ring(partition)
                        return
                for task in listeners:
                    if task.done():
                        task.result()  # raises what ended it
            finally:
                for task in listeners:
                    task.cancel()
                await asyncio.gather(*listeners, return_exceptions=True)
        finally:
            for client in clients:
                with contextlib.suppress(Exception):
                    await client.aclose()

    async def _enable(self, client: Redis) -> None:
        try:
            flags = (await client.config_get("notify-keyspace-events")).get(
                "notify-keyspace-events", ""
            )
            wanted = with_stream_events(flags)
            if wanted != flags:
                await client.config_set("notify-keyspace-events", wanted)
        except ResponseError as error:  # CONFIG renamed or refused: the sweep alone
            if not self._warned_config:
                self._warned_config = True
                log.warning(
                    "stream doorbell: cannot turn on keyspace notifications (%s); new entries"
                    " are found by the once-a-second sweep",
                    error,
                )

    async def _listen(self, client: Redis) -> None:
        async with client.pubsub() as pubsub:
            await pubsub.subscribe(CHANNEL)
            async for message in pubsub.listen():
                if message.get("type") != "message":
                    continue
                partition = _STREAM_PARTITION.get(message.get("data"))
                if partition is not None:
                    self.ring(partition)
