"""The reservation saga's steps on the phone partitions and the fence on the order's
partition (docs/data-tier.md, section 3): each is one script on one partition's keys,
idempotent by order id, so a call the Redis client retried after a lost reply gives the
same answer and moves nothing twice. This module only builds their keys and arguments;
the settler (app/orders/settler.py) and the order path call them.

Outcomes of an order, as the fence decides them: ``committed`` (the order exists) or
``aborted`` (it never will: an abort marker is there).

A grant (docs/escrow.md, section 4: a refill of a stripe) is a reservation too, under a
grant id minted in the stripe's host partition: ``reserve_grant`` holds its units, the
fence decides it by its receipt on the host (kind ``GRANT``), and ``settle_many`` settles
it with the orders (committed: held -> lent).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from typing import Any

from app import keys
from app.fields import STOCK_LIMIT
from app.partitions import partition_of
from app.scripts import ScriptResult, Scripts
from app.settings import RESERVATION_TTL_MAX_MS
from app.vocabulary import ItemLine, decode_grant, decode_items, encode_items

COMMITTED = "committed"
ABORTED = "aborted"
OUTCOMES = (COMMITTED, ABORTED)

# The fence's kinds of id (fence_orders.lua's ARGV[2] letters): an order, proven
# committed by its order hash; a grant, by its receipt on its host partition.
ORDER = "o"
GRANT = "g"

# How long past the longest reservation TTL an abort marker or a release tombstone is kept:
# room for the clocks of the apps (which mint expiries and prune) and of the Redis nodes
# (which refuse a reserve or commit past its expiry by TIME) to disagree, and for a
# failover to a node whose clock is behind.
TOMBSTONE_MARGIN_MS = 60_000


def crash_if(point: str, fault_point: str) -> None:
    """Test-only (SAGA_FAULT_POINT): die here as kill -9 would kill the worker, with
    nothing after this step run, so the crash-point tests see what the settler finds."""
    if point == fault_point:
        os.kill(os.getpid(), signal.SIGKILL)


def keep_until(now_ms: int | None = None) -> int:
    """When an abort marker or release tombstone written now may be pruned (ms).

    Every step of an order carries its reservation's expiry, at most
    RESERVATION_TTL_MAX_MS after its id was minted, and reserve_stock and commit_order
    refuse it past that expiry by Redis TIME. A marker is written after its order id was
    minted, so by this time no reserve or commit of that order can run any more, marker
    or not: the marker has done its work (docs/data-tier.md, 3.2)."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    return now + RESERVATION_TTL_MAX_MS + TOMBSTONE_MARGIN_MS


# A settle meets a reservation other than the one its caller read only when a late
# reserve landed in between; the script answers the stored lines, and one more try
# with them settles it. More than that is a broken invariant, not a race.
SETTLE_ATTEMPTS = 3


def lines_by_partition(lines: Iterable[tuple[str, int]]) -> dict[int, list[tuple[str, int]]]:
    """An order's (phone id, quantity) lines grouped by their phone's partition, each
    group in the order's line order."""
    groups: dict[int, list[tuple[str, int]]] = {}
    for phone_id, quantity in lines:
        groups.setdefault(partition_of(phone_id), []).append((phone_id, quantity))
    return groups


def items_by_partition(items: str) -> dict[int, str]:
    """An order's items field split by phone partition, each part an items field itself
    (return_stock's lines)."""
    groups: dict[int, list[ItemLine]] = {}
    for line in decode_items(items):
        groups.setdefault(partition_of(line.phone_id), []).append(line)
    return {partition: encode_items(lines) for partition, lines in groups.items()}


def _partition_keys(partition: int) -> list[str]:
    return [
        keys.reservations(partition),
        keys.reservations_due(partition),
        keys.releases(partition),
        keys.ledger(partition),
    ]


def _settle_keys(partition: int) -> list[str]:
    """settle_reservation.lua's KEYS before the phones'."""
    return [*_partition_keys(partition), keys.releases_due(partition)]


async def reserve(
    scripts: Scripts,
    order_id: str,
    partition: int,
    lines: list[tuple[str, int]],
    expires_at_ms: int,
    *,
    striping_rule: str = "",
) -> ScriptResult:
    """reserve_stock.lua on one phone partition: 200 with the reserved ``lines`` (prices
    included), or the 404/409 of that partition's lines, or 409 ``order_released``.
    ``striping_rule`` (app/orders/grants.py: STRIPING_RULE, when ESCROW_STRIPES is on):
    the reserve counts its phones' apart orders and sets a hot, deep one striped, which
    its 200 names (``striped``)."""
    args: list[str | int] = [order_id, expires_at_ms]
    for phone_id, quantity in lines:
        args += [phone_id, quantity]
    if striping_rule:
        args.append(striping_rule)
    script_keys = [*_partition_keys(partition), *(keys.phone(phone_id) for phone_id, _ in lines)]
    return await scripts.call("reserve_stock", script_keys, args)


async def reserve_grant(
    scripts: Scripts,
    grant_id: str,
    phone_id: str,
    units: int,
    expires_at_ms: int,
    *,
    floor: int,
    shares: int,
    minimum: int,
) -> ScriptResult:
    """reserve_grant.lua on the phone's partition: a grant of up to ``units`` units of
    ``phone_id`` to the stripe on the grant id's partition (its host), at most
    (stock - ``floor``) / ``shares`` and refused below ``minimum``. 200 with the stored
    ``reservation`` ("g <host> <gen> <line>") and its ``units``; 409 ``not_striped`` or
    ``grant_short``; 404; or the reserve's 409 ``order_released`` / ``order_expired``."""
    host = partition_of(grant_id)
    partition = partition_of(phone_id)
    return await scripts.call(
        "reserve_grant",
        [
            *_partition_keys(partition),
            keys.phone(phone_id),
            keys.stripe_hosts(phone_id),
            keys.grants_in_flight(phone_id),
        ],
        [grant_id, expires_at_ms, host, phone_id, units, floor, shares, minimum],
    )


def reservation_keys(stored: str) -> list[str]:
    """settle_reservation.lua's keys for one reservation as stored: the phone of each of
    its lines, and for a grant's, the phone's grants in flight after it."""
    grant = decode_grant(stored)
    if grant is None:
        return [keys.phone(line.phone_id) for line in decode_items(stored)]
    [line] = decode_items(grant.lines)
    return [keys.phone(line.phone_id), keys.grants_in_flight(line.phone_id)]


# One order (or grant) to settle on a phone partition: its id, its outcome, and the
# reservation as the caller read it ("" for none: an abort still leaves its tombstone).
Settlement = tuple[str, str, str]


async def settle_many(
    scripts: Scripts, partition: int, settlements: list[Settlement]
) -> list[dict[str, Any]]:
    """settle_reservation.lua on one phone partition for several orders in one call:
    each order's result, in order (``{"outcome", "settled"}``). An order a late reserve
    changed meanwhile is settled again with the lines the script answered."""
    for _, outcome, _ in settlements:
        if outcome not in OUTCOMES:
            raise ValueError(f"not an outcome: {outcome!r}")
    results: list[dict[str, Any]] = [{} for _ in settlements]
    todo = list(range(len(settlements)))
    for _ in range(SETTLE_ATTEMPTS):
        script_keys = _settle_keys(partition)
        args: list[str | int] = []
        for i in todo:
            order_id, outcome, lines = settlements[i]
            script_keys += reservation_keys(lines)
            args += [order_id, outcome, lines]
        args.append(keep_until())
        answer = await scripts.call("settle_reservation", script_keys, args)
        if answer.status != 200:
            for i in todo:
                results[i] = answer.payload
            return results
        retry = []
        for i, result in zip(todo, answer.payload["results"], strict=True):
            results[i] = result
            if result.get("code") == "reservation_changed":
                order_id, outcome, _ = settlements[i]
                settlements[i] = (order_id, outcome, result["lines"])
                retry.append(i)
        if not retry:
            break
        todo = retry
    return results


async def settle(
    scripts: Scripts, partition: int, order_id: str, outcome: str, reserved_lines: str
) -> dict[str, Any]:
    """One order's settle (``settle_many`` of one)."""
    [result] = await settle_many(scripts, partition, [(order_id, outcome, reserved_lines)])
    return result


async def fence(
    scripts: Scripts, partition: int, ids: list[str], kinds: list[str] | None = None
) -> list[str]:
    """fence_orders.lua on the ids' partition: each one's outcome (COMMITTED or ABORTED),
    in order. ``kinds``: ORDER or GRANT per id (default: every id an order's). A grant's
    partition is its host's (the grant id is minted there): committed when its receipt
    is there, else aborted, with an abort marker that makes its receipt impossible.
    The fence's write is confirmed by the replica (WAIT) before this returns on a
    cluster, or WriteUnconfirmed: only then may the caller release the units."""
    kinds = [ORDER] * len(ids) if kinds is None else kinds
    if len(kinds) != len(ids) or set(kinds) - {ORDER, GRANT}:
        raise ValueError(f"kinds {kinds!r} for {len(ids)} ids")
    proofs = [
        keys.grant_receipts(partition) if kind == GRANT else keys.order(some_id)
        for some_id, kind in zip(ids, kinds, strict=True)
    ]
    result = await scripts.call(
        "fence_orders",
        [keys.aborts(partition), keys.aborts_due(partition), *proofs],
        [keep_until(), "".join(kinds), *ids],
    )
    return list(result.payload["outcomes"])


async def fence_grants(scripts: Scripts, host: int, grant_ids: list[str]) -> list[str]:
    """The fence of grants only, on their host partition (``fence`` of kind GRANT)."""
    return await fence(scripts, host, grant_ids, [GRANT] * len(grant_ids))


async def prune_tombstones(
    scripts: Scripts, partition: int, now_ms: int, limit: int
) -> dict[str, int]:
    """prune_tombstones.lua on one partition: its abort markers and release tombstones
    whose keep-until time is past ``now_ms``, up to ``limit`` of each; how many went."""
    result = await scripts.call(
        "prune_tombstones",
        [
            keys.aborts(partition),
            keys.aborts_due(partition),
            keys.releases(partition),
            keys.releases_due(partition),
        ],
        [now_ms, limit],
    )
    return {kind: int(count) for kind, count in result.payload.items()}


async def return_stock(
    scripts: Scripts, partition: int, order_id: str, partition_items: str
) -> ScriptResult:
    """return_stock.lua on one phone partition, with the order's lines of that partition
    (``items_by_partition``)."""
    phone_keys = [keys.phone(line.phone_id) for line in decode_items(partition_items)]
    return await scripts.call(
        "return_stock",
        [
            keys.taken_back(partition),
            keys.reservations(partition),
            keys.reservations_due(partition),
            keys.ledger(partition),
            *phone_keys,
        ],
        [order_id, partition_items, STOCK_LIMIT],
    )
