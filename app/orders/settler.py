"""The settler: finishes what a dead app left of the reservation saga (docs/data-tier.md,
sections 3.2 and 3.3), as a background task in every web worker.

Each tick it looks, in one pipelined round, for partitions with due work: reservations
past their expiry (``rd``) and cancelled orders whose stock is still to come back
(``ro``). A partition with work is swept by one worker at a time, the holder of its
lease (``SET lease NX PX``). The lease only saves work: every step is an idempotent
script, so two sweepers of one partition (a lease that expired mid-sweep) give each
order the same outcome and move its units once.

* Due reservations: their orders' outcomes come from the fence on each order's own
  partition (the order exists: committed; else an abort marker makes sure it never
  will), and only then are they settled on the phone partition.
* Due take-backs: the order's lines, grouped by phone partition, go back to stock with
  return_stock; then the order leaves the take-back list.

``settler_ctx`` joins the app's cleanup_ctx when the order path runs the saga
(``Settings.order_saga``); the order path hands it the settles of its answers (``spawn``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from app import appkeys, keys
from app.orders import saga
from app.partitions import PARTITIONS, partition_of
from app.redis_gateway import RedisGateway
from app.scripts import Scripts

log = logging.getLogger("app.settler")

# How often a worker looks for due work, and how long a partition's sweep stays its
# own (docs/data-tier.md, 3.2: the bound on held stock adds these to the expiry).
SETTLE_INTERVAL_S = 1.0
LEASE_MS = 5000
# Orders settled per partition per tick: a backlog drains over a few ticks instead of
# one long sweep holding the event loop's attention.
BATCH = 100


def _now_ms() -> int:
    return int(time.time() * 1000)


def _holder_name() -> str:
    """Who holds a lease, as an operator reads it: host, process, and a random part."""
    return "-".join((socket.gethostname(), str(os.getpid()), secrets.token_hex(4)))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class Settler:
    gateway: RedisGateway
    scripts: Scripts
    interval_s: float = SETTLE_INTERVAL_S
    lease_ms: int = LEASE_MS
    batch: int = BATCH
    holder: str = field(default_factory=_holder_name)
    # Settling steps the order path hands over after its answer (spawn), kept referenced
    # until done: a task nobody holds may be collected before it runs.
    pending: set[asyncio.Task[Any]] = field(default_factory=set, repr=False)

    def spawn(self, step: Coroutine[Any, Any, Any]) -> None:
        """Run a settling step in the background. If it fails, its work stays due for
        the sweep, which is why nobody awaits it."""
        task = asyncio.create_task(step)
        self.pending.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self.pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("settling step failed, left to the sweep: %s", task.exception())

    async def run(self) -> None:
        """Sweep every interval until cancelled; a Redis error waits for the next tick
        (the work stays due, so nothing is lost by skipping one)."""
        while True:
            try:
                await self.sweep()
            except (RedisError, OSError) as error:
                log.warning("settler sweep failed: %s", error)
            await asyncio.sleep(self.interval_s)

    async def sweep(self, now_ms: int | None = None) -> int:
        """One tick: the orders this worker settled or took stock back for."""
        now = _now_ms() if now_ms is None else now_ms
        due = await self._partitions_with_due_work(now)
        done = 0
        for partition, (reservations_due, take_backs_due) in due.items():
            if not await self._lease(partition):
                continue
            if reservations_due:
                done += await self._settle_due_reservations(partition, now)
            if take_backs_due:
                done += await self._take_back_due(partition, now)
        return done

    async def _partitions_with_due_work(self, now: int) -> dict[int, tuple[bool, bool]]:
        probes = [
            ("ZRANGEBYSCORE", key(p), "-inf", now, "LIMIT", 0, 1)
            for key in (keys.reservations_due, keys.take_backs_due)
            for p in range(PARTITIONS)
        ]
        replies = await self.gateway.execute_many(probes)
        reservations, take_backs = replies[:PARTITIONS], replies[PARTITIONS:]
        return {
            p: (bool(reservations[p]), bool(take_backs[p]))
            for p in range(PARTITIONS)
            if reservations[p] or take_backs[p]
        }

    async def _lease(self, partition: int) -> bool:
        """This worker holds the partition's lease now (taken, or its own renewed)."""
        key = keys.settler_lease(partition)
        if await self.gateway.execute("SET", key, self.holder, "NX", "PX", self.lease_ms):
            return True
        if _text(await self.gateway.get(key) or b"") != self.holder:
            return False
        # Renewing after the GET may extend a lease another worker just took when ours
        # expired in between: both then sweep for a while, which the scripts make safe.
        await self.gateway.execute("PEXPIRE", key, self.lease_ms)
        return True

    async def _settle_due_reservations(self, partition: int, now: int) -> int:
        order_ids = [
            _text(order_id)
            for order_id in await self.gateway.execute(
                "ZRANGEBYSCORE",
                keys.reservations_due(partition),
                "-inf",
                now,
                "LIMIT",
                0,
                self.batch,
            )
        ]
        if not order_ids:
            return 0
        stored = await self.gateway.hmget(keys.reservations(partition), order_ids)
        by_order_partition: dict[int, list[tuple[str, str]]] = {}
        for order_id, lines in zip(order_ids, stored, strict=True):
            if lines is None:  # settled between the two reads
                continue
            by_order_partition.setdefault(partition_of(order_id), []).append(
                (order_id, _text(lines))
            )
        settled = 0
        for order_partition, entries in by_order_partition.items():
            outcomes = await saga.fence(
                self.scripts, order_partition, [order_id for order_id, _ in entries]
            )
            for (order_id, lines), outcome in zip(entries, outcomes, strict=True):
                result = await saga.settle(self.scripts, partition, order_id, outcome, lines)
                if result.status != 200:
                    log.error(
                        "settling %s on partition %d: %s", order_id, partition, result.payload
                    )
                    continue
                settled += result.flag
        return settled

    async def _take_back_due(self, partition: int, now: int) -> int:
        order_ids = [
            _text(order_id)
            for order_id in await self.gateway.execute(
                "ZRANGEBYSCORE",
                keys.take_backs_due(partition),
                "-inf",
                now,
                "LIMIT",
                0,
                self.batch,
            )
        ]
        taken = 0
        for order_id in order_ids:
            [items] = await self.gateway.hmget(keys.order(order_id), ["items"])
            if items is None:
                log.error("take-back of %s: no such order on partition %d", order_id, partition)
                continue
            refused = False
            for phone_partition, lines in saga.items_by_partition(_text(items)).items():
                result = await saga.return_stock(self.scripts, phone_partition, order_id, lines)
                if result.status != 200:
                    log.error(
                        "take-back of %s on %d: %s", order_id, phone_partition, result.payload
                    )
                    refused = True
            if refused:
                continue  # stays due: an operator sees it in the log and in ro
            # Every phone partition has it in its taken-back set: the list entry can go.
            await self.gateway.execute("ZREM", keys.take_backs_due(partition), order_id)
            taken += 1
        return taken


async def settler_ctx(app: web.Application) -> AsyncIterator[None]:
    """The settler's task for this worker's lifetime (after redis_ctx: it uses its gateway)."""
    settler = Settler(app[appkeys.REDIS_GATEWAY], app[appkeys.SCRIPTS])
    app[appkeys.SETTLER] = settler
    task = asyncio.create_task(settler.run(), name="settler")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # Let the last answers' settles finish while the connection is still open.
    await asyncio.gather(*settler.pending, return_exceptions=True)
