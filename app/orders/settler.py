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
  will), and only then are they settled on the phone partition. A grant's reservation
  (docs/escrow.md, section 4; its stored lines start with the grant head, app/vocabulary.py:
  decode_grant) is fenced the same way on its grant id's partition, the stripe's host,
  by its receipt there (fence kind GRANT), and settled with the orders (committed: lent).
* Due take-backs: the order's lines, grouped by phone partition, go back to stock with
  return_stock; then the order leaves the take-back list. An order sold from stripes
  gives them back to its stripes, or to the pools if they closed since
  (app/orders/stripe_cancel.py: give_back).
* Due reprices (a cluster's only): a striped phone's price change whose request died
  before every stripe had it (``sp``, docs/escrow.md section 6) is written to them.
* Escrow's recalls (app/orders/recall.py; a cluster's only): phones a dead app left
  draining past their grace (``sw``), and shipments of closed stripes not received by
  their due time (``sz``), are recalled again from the recall's first step (every step is
  idempotent: a closed stripe answers its shipment again, the pool takes it once); one
  not finished (a node down) is due again a grace later. A received shipment leaves
  ``sz`` here (its close does not wait for that). Every ``PRUNE_EVERY`` ticks, stripes left
  on a partition that is no longer a host partition (a reshard) are recalled too
  (``recall_foreign_stripes``).
* Every ``PRUNE_EVERY`` ticks, abort markers and release tombstones past their keep-until
  time (app/orders/saga.py: keep_until) go, with prune_tombstones on each partition that
  has any: without it they would pile up for every aborted order, forever.

``settler_ctx`` is in the app's cleanup_ctx on both tiers (a collapsed order leaves it
nothing to settle); the split order path hands it the settles of its answers
(``settle_soon``), which it sends one call per phone partition every ``SETTLE_DELAY_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from app import appkeys, keys
from app.orders import recall, saga, stripe_cancel
from app.partitions import PARTITIONS, partition_of
from app.phones import stripes
from app.redis_gateway import RedisGateway, WriteUnconfirmed
from app.scripts import Scripts
from app.vocabulary import ORDER_FIELDS, decode_grant, shipment_phone

log = logging.getLogger("app.settler")

# How often a worker looks for due work, and how long a partition's sweep stays its
# own (docs/data-tier.md, 3.2: the bound on held stock adds these to the expiry).
SETTLE_INTERVAL_S = 1.0
LEASE_MS = 5000
# How long the order path's settles are gathered before one call per phone partition.
SETTLE_DELAY_S = 0.05
# Settle calls of one flush in flight at once.
SETTLE_CALLS = 8
# Orders settled per partition per tick: a backlog drains over a few ticks instead of
# one long sweep holding the event loop's attention.
BATCH = 100
# Markers and tombstones pruned per partition per call: aborts may come in bursts (a
# sold-out phone refuses hundreds of orders), and the pruning runs only every PRUNE_EVERY ticks.
PRUNE_BATCH = 1000
# Phones read per round when looking for stripes off the host partitions.
FOREIGN_PAGE = 1000
# Ticks between two prunings of the abort markers and release tombstones: they are kept
# for minutes (saga.keep_until), so looking for due ones every tick would be wasted probes.
PRUNE_EVERY = 30


def _now_ms() -> int:
    return int(time.time() * 1000)


def _holder_name() -> str:
    """Who holds a lease, as an operator reads it: host, process, and a random part."""
    return "-".join((socket.gethostname(), str(os.getpid()), secrets.token_hex(4)))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class DueWork:
    """Which kinds of work a partition has due (the sweep's probes)."""

    reservations: bool
    take_backs: bool
    reprices: bool = False
    drains: bool = False
    shipments: bool = False


@dataclass
class Settler:
    gateway: RedisGateway
    scripts: Scripts
    interval_s: float = SETTLE_INTERVAL_S
    lease_ms: int = LEASE_MS
    batch: int = BATCH
    holder: str = field(default_factory=_holder_name)
    prune_every: int = PRUNE_EVERY
    # Settles the order path hands over after its answers (settle_soon), gathered per
    # phone partition for settle_delay_s, then one call per partition: a call costs Redis
    # about as much as settling one order, and orders rarely share a partition within
    # one turn of the loop. The wait costs nothing sold: held units are not in stock.
    settle_delay_s: float = SETTLE_DELAY_S
    _queued: dict[int, list[saga.Settlement]] = field(default_factory=dict, repr=False)
    # Their calls in flight, kept referenced until done: a task nobody holds may be
    # collected before it runs.
    pending: set[asyncio.Task[Any]] = field(default_factory=set, repr=False)

    def settle_soon(self, partition: int, order_id: str, outcome: str, lines: str) -> None:
        """Settle one order's reservation on ``partition`` within ``settle_delay_s``,
        together with every other order answered meanwhile. Nobody awaits it: if the call
        fails, the reservation stays due and the sweep settles it."""
        if not self._queued:
            asyncio.get_running_loop().call_later(self.settle_delay_s, self._flush)
        self._queued.setdefault(partition, []).append((order_id, outcome, lines))

    def _flush(self) -> None:
        queued, self._queued = self._queued, {}
        task = asyncio.create_task(self._settle_queued(queued))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _settle_queued(self, queued: dict[int, list[saga.Settlement]]) -> None:
        """One call per partition, at most SETTLE_CALLS at once: a flush may name every
        partition, and a node's connection pool refuses calls past its size."""
        calls = asyncio.Semaphore(SETTLE_CALLS)

        async def settle(partition: int, settlements: list[saga.Settlement]) -> None:
            async with calls:
                try:
                    await saga.settle_many(self.scripts, partition, settlements)
                except (RedisError, OSError, WriteUnconfirmed) as error:
                    # Unconfirmed (a failover under way): settled again by the sweep,
                    # as idempotent as the first time.
                    log.warning("settling on %d failed, left to the sweep: %r", partition, error)

        await asyncio.gather(*(settle(p, settlements) for p, settlements in queued.items()))

    async def drain(self) -> None:
        """Until every settle handed over so far has run (shutdown; measurements)."""
        while self._queued or self.pending:
            if self.pending:
                await asyncio.gather(*self.pending, return_exceptions=True)
            else:
                await asyncio.sleep(self.settle_delay_s)  # the queued flush is timed

    async def run(self) -> None:
        """Sweep every interval until cancelled; a Redis error waits for the next tick
        (the work stays due, so nothing is lost by skipping one)."""
        tick = 0
        while True:
            tick += 1
            try:
                await self.sweep()
                if tick % self.prune_every == 0:
                    await self.prune()
                    await self.recall_foreign_stripes()
            except (RedisError, OSError, WriteUnconfirmed) as error:
                # Unconfirmed: a fence the replica may not have; nothing after it ran.
                log.warning("settler sweep failed: %s", error)
            except Exception:
                # A bug in one sweep must not end the worker's settling for good: held
                # stock would then wait for another worker, or forever with one.
                log.exception("settler sweep failed")
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Our cancel was swallowed inside the sweep (seen in redis-py's start-up
                # of a connection): stop as asked instead of sleeping on.
                raise asyncio.CancelledError
            await asyncio.sleep(self.interval_s)

    async def sweep(self, now_ms: int | None = None) -> int:
        """One tick: the orders this worker settled or took stock back for."""
        now = _now_ms() if now_ms is None else now_ms
        due = await self._partitions_with_due_work(now)
        done = 0
        for partition, work in due.items():
            if not await self._lease(partition):
                continue
            if work.reservations:
                done += await self._settle_due_reservations(partition, now)
            if work.take_backs:
                done += await self._take_back_due(partition, now)
            if work.reprices:
                done += await self._reprice_due(partition, now)
            if work.drains:
                done += await self._recall_drains(partition, now)
            if work.shipments:
                done += await self._receive_shipments_due(partition, now)
        return done

    async def prune(self, now_ms: int | None = None) -> dict[str, int]:
        """Abort markers and release tombstones past their keep-until time, from every
        partition with any: how many of each went. No lease: the script is idempotent and
        the work is a few deletions."""
        now = _now_ms() if now_ms is None else now_ms
        probes = [
            ("ZRANGEBYSCORE", key(p), "-inf", now, "LIMIT", 0, 1)
            for p in range(PARTITIONS)
            for key in (keys.aborts_due, keys.releases_due)
        ]
        replies = await self.gateway.execute_many(probes)
        pruned = {"aborts": 0, "releases": 0}
        for p in range(PARTITIONS):
            if not (replies[2 * p] or replies[2 * p + 1]):
                continue
            for kind, count in (
                await saga.prune_tombstones(self.scripts, p, now, PRUNE_BATCH)
            ).items():
                pruned[kind] += count
        return pruned

    async def recall_foreign_stripes(self) -> list[str]:
        """Stripes left on a partition that is no longer a host partition (a reshard moved
        it to a primary with a lower one, or its primary's lowest partition moved away:
        docs/escrow.md, section 5): no order reaches them, so their units would sit idle
        until the phone's pool ran short. Every PRUNE_EVERY ticks, on a cluster: one
        pipelined read of every non-host partition's ledger (its received_units: units in
        open stripes there); only when one holds any, the phones of every partition whose
        ledger lends (lent_units) are read with their stripe hosts (sh{Q}X, pipelined
        per page of the partition's phone list), and each phone with a stripe on such a
        partition is recalled (it is pool-only afterwards; its grants start again on the
        current hosts). The phones recalled."""
        hosts = set(self.gateway.host_partitions())
        if self.gateway.one_node or not hosts:
            return []
        ledgers = await self.gateway.execute_many(
            [("HMGET", keys.ledger(p), "received_units", "lent_units") for p in range(PARTITIONS)]
        )
        foreign = {
            p
            for p, (received, _) in enumerate(ledgers)
            if p not in hosts and int(received or 0) > 0
        }
        if not foreign:
            return []
        recalled: list[str] = []
        for partition, (_, lent) in enumerate(ledgers):
            if int(lent or 0) <= 0:
                continue
            start = 0
            while page := [
                _text(phone_id)
                for phone_id in await self.gateway.execute(
                    "ZRANGE", keys.phones(partition), start, start + FOREIGN_PAGE - 1
                )
            ]:
                start += FOREIGN_PAGE
                stripe_hosts = await self.gateway.execute_many(
                    [("SMEMBERS", keys.stripe_hosts(phone_id)) for phone_id in page]
                )
                for phone_id, members in zip(page, stripe_hosts, strict=True):
                    if foreign & {int(_text(host)) for host in members}:
                        await recall.recall(self.scripts, phone_id)
                        recalled.append(phone_id)
        if recalled:
            log.info("recalled %d phones' stripes off partitions %s", len(recalled), foreign)
        return recalled

    async def _partitions_with_due_work(self, now: int) -> dict[int, DueWork]:
        # Stripes exist on a cluster only (docs/escrow.md, section 0), so their reprices,
        # recalls and shipments are looked for there only, in the same round trip.
        kinds = [keys.reservations_due, keys.take_backs_due]
        if not self.gateway.one_node:
            kinds += [keys.reprices_due, keys.drains_due, keys.shipments_due]
        probes = [
            ("ZRANGEBYSCORE", key(p), "-inf", now, "LIMIT", 0, 1)
            for key in kinds
            for p in range(PARTITIONS)
        ]
        replies = await self.gateway.execute_many(probes)
        found = [
            [bool(reply) for reply in replies[k * PARTITIONS : (k + 1) * PARTITIONS]]
            for k in range(len(kinds))
        ]
        found += [[False] * PARTITIONS] * (5 - len(kinds))
        return {
            p: DueWork(*(kind[p] for kind in found))
            for p in range(PARTITIONS)
            if any(kind[p] for kind in found)
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
        # By the partition that decides each: an order's own, a grant's host (its id's).
        by_order_partition: dict[int, list[tuple[str, str]]] = {}
        for order_id, lines in zip(order_ids, stored, strict=True):
            if lines is None:  # settled between the two reads
                continue
            by_order_partition.setdefault(partition_of(order_id), []).append(
                (order_id, _text(lines))
            )
        settlements: list[saga.Settlement] = []
        for order_partition, entries in by_order_partition.items():
            # The fence's write is confirmed (WAIT) before it answers, for a grant as for
            # an order: a failover must not drop the marker that refuses a late receipt.
            outcomes = await saga.fence(
                self.scripts,
                order_partition,
                [order_id for order_id, _ in entries],
                [saga.ORDER if decode_grant(lines) is None else saga.GRANT for _, lines in entries],
            )
            settlements += [
                (order_id, outcome, lines)
                for (order_id, lines), outcome in zip(entries, outcomes, strict=True)
            ]
        if not settlements:
            return 0
        # Every fenced order of this partition in one call.
        results = await saga.settle_many(self.scripts, partition, settlements)
        settled = 0
        for (order_id, _, _), result in zip(settlements, results, strict=True):
            if "settled" not in result:
                log.error("settling %s on partition %d: %s", order_id, partition, result)
                continue
            settled += result["settled"] == "1"
        return settled

    async def _due(self, key: str, now: int) -> list[str]:
        return [
            _text(member)
            for member in await self.gateway.execute(
                "ZRANGEBYSCORE", key, "-inf", now, "LIMIT", 0, self.batch
            )
        ]

    async def _recall_drains(self, partition: int, now: int) -> int:
        finished = 0
        for phone_id in await self._due(keys.drains_due(partition), now):
            try:
                recalled = await recall.recall(self.scripts, phone_id)
            except (RuntimeError, WriteUnconfirmed) as error:
                log.warning("recall of %s failed, due again: %r", phone_id, error)
                recalled = None
            if recalled is not None and recalled.done:
                finished += 1
                continue
            # Still out (a node down): due again a grace later; a phone whose recall
            # finished has left the list (receive_shipments).
            await self.gateway.execute(
                "ZADD",
                keys.drains_due(partition),
                "XX",
                now + recall.RECALL_GRACE_MS,
                phone_id,
            )
        return finished

    async def _receive_shipments_due(self, host: int, now: int) -> int:
        received = 0
        for shipment_id in await self._due(keys.shipments_due(host), now):
            phone_id = shipment_phone(shipment_id)
            taken_back = keys.taken_back(partition_of(phone_id))
            if not await self.gateway.execute("SISMEMBER", taken_back, shipment_id):
                try:
                    await recall.recall(self.scripts, phone_id)
                except (RuntimeError, WriteUnconfirmed) as error:
                    log.warning("recall of %s for %s failed: %r", phone_id, shipment_id, error)
            if await self.gateway.execute("SISMEMBER", taken_back, shipment_id):
                await self.gateway.execute("ZREM", keys.shipments_due(host), shipment_id)
                received += 1
            else:
                await self.gateway.execute(
                    "ZADD",
                    keys.shipments_due(host),
                    "XX",
                    now + recall.RECALL_GRACE_MS,
                    shipment_id,
                )
        return received

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
            items, mark = await self.gateway.hmget(
                keys.order(order_id), [ORDER_FIELDS["items"], ORDER_FIELDS["stripe"]]
            )
            if items is None:
                log.error("take-back of %s: no such order on partition %d", order_id, partition)
                continue
            if mark is not None:
                # Sold from stripes: back to them, or to the pools if they closed since.
                if await stripe_cancel.give_back(self.scripts, order_id, _text(items), _text(mark)):
                    await self.gateway.execute("ZREM", keys.take_backs_due(partition), order_id)
                    taken += 1
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

    async def _reprice_due(self, partition: int, now: int) -> int:
        """Price changes whose request died before every stripe had the new price
        (docs/escrow.md, section 6): finished with the phone's price now."""
        entries = await self.gateway.execute(
            "ZRANGEBYSCORE", keys.reprices_due(partition), "-inf", now, "LIMIT", 0, self.batch
        )
        for entry in entries:
            await stripes.finish_reprice(self.scripts, self.gateway, partition, _text(entry))
        return len(entries)


async def settler_ctx(app: web.Application) -> AsyncIterator[None]:
    """The settler's task for this worker's lifetime (after redis_ctx: it uses its gateway)."""
    settler = Settler(app[appkeys.REDIS_GATEWAY], app[appkeys.SCRIPTS])
    app[appkeys.SETTLER] = settler
    task = asyncio.create_task(settler.run(), name="settler")
    yield
    # Settler.run stops even when the sweep swallowed this cancel (a cancel that landed
    # while redis-py's RedisCluster was starting up once hung the shutdown for good).
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # Let the last answers' settles finish while the connection is still open.
    await settler.drain()
