"""The conservation audit: stock and money balance against everything ever added.

It never holds Redis for more than one small batch, so it finishes at any size
while orders keep flowing. It works partition by partition (app/keys.py) and
sums, so every step reads keys of one partition (one slot on Redis Cluster):

1. Each partition's ledger (``keys.ledger(P)``), the running totals every
   money-or-stock script moves in the same step as its rows, is read
   atomically with the newest member of that partition's indexes
   (app/lua/read_ledger.lua, all partitions in one pipeline). Its identities
   hold at every moment in each partition (balances + open + completed =
   money ever added, on a customer's partition; stock + held + sold = units
   ever added, on a phone's), so they are checked exactly whatever the load.
2. Every phone, customer and order that existed then is recounted from its
   row, BATCH at a time, partition by partition: one ZRANGE BYSCORE page of
   an index, then one read-only script reading that page's rows (no MULTI,
   no WATCH). Orders are walked through their status indexes, final statuses
   first (there is no index of all orders): under writes an order whose
   status changes meanwhile may be missed, never counted twice. Checks on a
   single row (no negative stock or balance, an order's total is the sum of
   its lines, no index entry without its row) hold at every moment too.
3. The ledgers are read again. When no script wrote in between (the sum of
   their ``changes`` counts did not move; each only grows), every partition
   was still at the state of its first read when its rows were recounted, and
   all first reads came before all last reads: the recount is the shop at one
   moment and must equal the ledgers field by field, partition by partition,
   and every phone's stock + units sold must equal its units ever added:
   exact, as of the end of the audit. When writes came in, those checks
   cannot be exact; the totals that only ever grow (money and units ever
   added, completed orders...) must still lie between the ledgers' figures at
   start and at end, and the rest are reported as not checked. The answer
   says which checks ran, how, and as of when; its figures are sums over the
   partitions.

A database written before the ledger existed has rows but no ledger: the
audit then says so (check ``ledger_present``) and how to rebuild it
(app/admin/ledger_rebuild.py), instead of reporting every figure as differing.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app import keys
from app.partitions import PARTITIONS, partition_of
from app.scripts import load_source
from app.timestamps import iso_time
from app.vocabulary import (
    FINAL_STATUSES,
    MONEY_KEEPING_STATUSES,
    ORDER_FIELDS,
    ORDER_STATUSES,
    decode_items,
    parse_stripe_mark,
)

LEDGER_MISSING = (
    "ledger missing: this database was written before the ledger existed. Stop every "
    "writer (the app instances), then run `python -m app.admin.ledger_rebuild` to rebuild "
    "it from the rows; until then the checks against the ledger cannot run."
)

# Rows per round trip. One read_rows call costs Redis a few microseconds a
# row (measured 3.8 ms for 500 on a busy 2-core box): 200 keeps each call
# near a millisecond.
BATCH = 200
# The ledger reads in flight at once on a cluster. All 128 at once made a fresh client
# open as many connections at once, and redis-py once failed one of them mid-connect
# (AttributeError: its writer None; a 503 here, a failed bench audit).
LEDGER_CALLS = 16

# Ledger fields (app/keys.py), and those that never decrease (rows are never
# deleted, no order leaves a final status): their recount lies between the
# ledger's figures at the start and at the end of the audit whatever the writes.
LEDGER_FIELDS = (
    "phones",
    "customers",
    *(f"orders_{status}" for status in ORDER_STATUSES),
    "balance_cents",
    "added_cents",
    *(f"{status}_cents" for status in MONEY_KEEPING_STATUSES),
    "stock_units",
    "added_units",
    "held_units",
    "sold_units",
    *(f"{status}_units" for status in MONEY_KEEPING_STATUSES),
    # Escrow (docs/escrow.md, section 8): on a phone's partition the units its pools lent
    # to stripes and have not had back; on a stripe host partition its stripes' stock,
    # their units sold, and the units received less those shipped home. All 0 where no
    # stripe exists (one redis-server always).
    "lent_units",
    "stripe_units",
    "stripe_sold_units",
    "received_units",
    "changes",
)
GROWING = frozenset(
    {
        "phones",
        "customers",
        "added_cents",
        "added_units",
        *(f"orders_{status}" for status in FINAL_STATUSES),
        *(
            f"{status}_{unit}"
            for status in FINAL_STATUSES
            if status in MONEY_KEEPING_STATUSES
            for unit in ("cents", "units")
        ),
    }
)


@dataclass
class Recount:
    """The same figures as the ledgers, summed from the rows, per partition."""

    partitions: dict[int, Counter[str]] = field(
        default_factory=lambda: {p: Counter() for p in range(PARTITIONS)}
    )
    sold: Counter[str] = field(default_factory=Counter)  # phone id -> units in open+completed
    phone_rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> stock, added
    lent: Counter[str] = field(default_factory=Counter)  # phone id -> its pool's lent units
    # (host partition, phone id) -> the stripe's stock, sold, got, epoch (escrow), read
    # from the hosts each phone's stripe_hosts set names.
    stripes: dict[tuple[int, str], tuple[int, int, int, int]] = field(default_factory=dict)
    # Lines of live orders sold from a stripe: (host, epoch, phone id, units). Their units
    # are in that stripe's sold while it is at that epoch, else (closed since, shipped
    # home) in the pool's: placed once every stripe was read (_place_stripe_lines).
    stripe_lines: list[tuple[int, int, str, int]] = field(default_factory=list)
    # phone id -> units of live orders sold from its stripes and still counted there.
    stripe_sold: Counter[str] = field(default_factory=Counter)
    negative_stock: list[str] = field(default_factory=list)
    negative_balances: list[str] = field(default_factory=list)
    bad_rows: list[dict[str, Any]] = field(default_factory=list)
    dangling: list[dict[str, str]] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def totals(self) -> Counter[str]:
        return _sum(self.partitions.values())


def _sum(figures: Any) -> Counter[str]:
    total: Counter[str] = Counter()
    for one in figures:
        total.update(one)
    return total


@dataclass(frozen=True)
class Start:
    """What the audit (or a ledger rebuild) reads first: each partition's ledger
    with its indexes' newest scores, each partition in one atomic step."""

    ledgers: dict[int, dict[str, int]]
    present: dict[int, bool]
    last: dict[str, float]  # index -> its newest score: the rows to recount
    at_ms: int

    @property
    def ledger(self) -> dict[str, int]:
        """The sum over the partitions."""
        return dict(_sum(self.ledgers.values()))


# The order statuses in the order the recount walks their indexes: the final ones first.
# An order leaves a status only from ``open`` into a final one, never back, so an order
# that moves while its partition is walked is read at most once (it can be missed, when
# it moves into a status already walked past it: the bounds check allows that, and at
# rest nothing moves). There is no index of all orders (app/keys.py, layout 5).
_WALK = (*FINAL_STATUSES, *(s for s in ORDER_STATUSES if s not in FINAL_STATUSES))


# The order fields the recount reads, in the order _recount_orders unpacks them.
_ORDER_ROW = ("status", "items", "total_cents", "stripe")


def _indexes(partition: int) -> tuple[str, ...]:
    """What the start reads the newest of: the phones, the customers, the orders' seq
    clock (their status lists are in chunks, app/keys.py: the clock is the newest), and
    the stripes' shipments due (escrow: any there means units on their way home, so not
    at rest)."""
    return (
        keys.phones(partition),
        keys.customers(partition),
        keys.orders_seq(partition),
        keys.shipments_due(partition),
    )


async def _read_ledgers(
    redis: Redis, with_indexes: bool
) -> tuple[dict[int, dict[str, int]], dict[int, bool], dict[str, float], int]:
    """Every partition's ledger (and newest index scores), each atomically, in one
    round trip; then Redis's clock."""
    read_ledger = redis.register_script(load_source("read_ledger"))
    script_keys = [
        [keys.ledger(p), *(_indexes(p) if with_indexes else ())] for p in range(PARTITIONS)
    ]
    if isinstance(redis, RedisCluster):
        # A cluster pipeline refuses a script by name (redis-py blocks EVALSHA there):
        # one routed call per partition instead, LEDGER_CALLS in flight at once.
        calls = asyncio.Semaphore(LEDGER_CALLS)

        async def read(names: list[str]) -> Any:
            async with calls:
                return await read_ledger(keys=names, args=LEDGER_FIELDS)

        replies = await asyncio.gather(*(read(names) for names in script_keys))
        seconds, micros = await redis.time()
    else:
        async with redis.pipeline(transaction=False) as pipe:
            for names in script_keys:
                await read_ledger(keys=names, args=LEDGER_FIELDS, client=pipe)
            pipe.time()
            *replies, (seconds, micros) = await pipe.execute()
    ledgers, present, last = {}, {}, {}
    for p, (exists, values, newest) in enumerate(replies):
        ledgers[p] = _ledger(values)
        present[p] = bool(exists)
        if with_indexes:
            for index, score in zip(_indexes(p), newest, strict=True):
                last[index] = float(score) if score else 0.0
    return ledgers, present, last, seconds * 1000 + micros // 1000


async def read_start(redis: Redis) -> Start:
    """Each partition's ledger and its indexes' newest scores."""
    ledgers, present, last, at_ms = await _read_ledgers(redis, with_indexes=True)
    return Start(ledgers, present, last, at_ms)


async def _end(redis: Redis) -> tuple[dict[int, dict[str, int]], int]:
    ledgers, _, _, at_ms = await _read_ledgers(redis, with_indexes=False)
    return ledgers, at_ms


def _ledger(values: list[bytes | None]) -> dict[str, int]:
    return {name: int(value or 0) for name, value in zip(LEDGER_FIELDS, values, strict=True)}


async def _rows(
    redis: Redis, index: str, last_score: float, row_key: Any, fields: list[str]
) -> AsyncIterator[list[tuple[str, list[bytes | None]]]]:
    """Every member of ``index`` scored up to ``last_score``, BATCH at a time,
    with the given fields of its row: one ZRANGE BYSCORE page, then one
    read_rows call (each row read atomically, the batch too)."""
    if not last_score:
        return  # the index was empty at the start
    read_rows = redis.register_script(load_source("read_rows"))
    width = len(fields)
    after = "-inf"
    while True:
        page = await redis.zrangebyscore(
            index, after, last_score, start=0, num=BATCH, withscores=True
        )
        if not page:
            return
        members = [member.decode() for member, _ in page]
        flat = await read_rows(keys=[row_key(member) for member in members], args=fields)
        yield [(member, flat[i * width : (i + 1) * width]) for i, member in enumerate(members)]
        after = f"({page[-1][1]!r}"


async def recount_rows(redis: Redis, last: dict[str, float]) -> Recount:
    found = Recount()
    for partition in range(PARTITIONS):
        await _recount_partition(redis, last, partition, found)
    _place_stripe_lines(found)
    return found


# A phone row's fields the recount reads, in the order _recount_partition unpacks them.
_PHONE_ROW = ["stock", "added_units", "held", "sold", "lent", "mode"]
# A stripe's (docs/escrow.md, section 2).
_STRIPE_ROW = ["stock", "sold", "got", "epoch"]


async def _recount_stripes(redis: Redis, found: Recount, phone_ids: list[str]) -> None:
    """The stripes of ``phone_ids`` (phones of ``partition`` that are or were striped):
    their hosts from each phone's stripe_hosts set (one round trip), then each host's
    stripes in one read_rows call. A host named with no stripe there (a grant whose
    receipt never came) counts nothing."""
    if not phone_ids:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for phone_id in phone_ids:
            pipe.smembers(keys.stripe_hosts(phone_id))
        hosts_of = await pipe.execute()
    by_host: dict[int, list[str]] = {}
    for phone_id, hosts in zip(phone_ids, hosts_of, strict=True):
        for host in hosts:
            by_host.setdefault(int(host), []).append(phone_id)
    read_rows = redis.register_script(load_source("read_rows"))
    width = len(_STRIPE_ROW)
    for host, striped in sorted(by_host.items()):
        stripe_keys = [keys.stripe(host, phone_id) for phone_id in striped]
        flat = await read_rows(keys=stripe_keys, args=_STRIPE_ROW)
        totals = found.partitions[host]
        for i, (phone_id, key) in enumerate(zip(striped, stripe_keys, strict=True)):
            stock, sold, got, epoch = (int(v or 0) for v in flat[i * width : (i + 1) * width])
            found.stripes[(host, phone_id)] = (stock, sold, got, epoch)
            totals["stripe_units"] += stock
            totals["stripe_sold_units"] += sold
            totals["received_units"] += got
            if min(stock, sold, got) < 0 or stock + sold != got:
                found.bad_rows.append({"stripe": key, "stock": stock, "sold": sold, "got": got})


def _place_stripe_lines(found: Recount) -> None:
    """A live order's line sold from a stripe counts in that stripe's sold while the stripe
    is at the order's epoch; once it closed (another epoch) its sold went home with the
    shipment, into the pool's (docs/escrow.md, sections 5 and 8)."""
    for host, epoch, phone_id, quantity in found.stripe_lines:
        stripe = found.stripes.get((host, phone_id))
        if stripe is not None and stripe[3] == epoch:
            found.stripe_sold[phone_id] += quantity  # the stripe rows count its ledger's
        else:
            found.partitions[partition_of(phone_id)]["sold_units"] += quantity


async def _recount_partition(
    redis: Redis, last: dict[str, float], partition: int, found: Recount
) -> None:
    totals = found.partitions[partition]
    phones, customers = keys.phones(partition), keys.customers(partition)
    async for batch in _rows(redis, phones, last[phones], keys.phone, _PHONE_ROW):
        striped = []
        for phone_id, (stock, added, held, sold, lent, mode) in batch:
            if stock is None:
                found.dangling.append({"index": phones, "id": phone_id})
                continue
            stock, added = int(stock), int(added)
            held, sold, lent = int(held or 0), int(sold or 0), int(lent or 0)
            totals["phones"] += 1
            totals["stock_units"] += stock
            totals["added_units"] += added
            totals["lent_units"] += lent
            found.phone_rows[phone_id] = (stock, added)
            found.lent[phone_id] = lent
            if stock < 0:
                found.negative_stock.append(phone_id)
            if stock > added:
                found.bad_rows.append({"phone_id": phone_id, "stock": stock, "added": added})
            # Every unit of the phone is in its pool, held by a reservation, sold from the
            # pool, or lent to stripes (docs/escrow.md, section 8): at every moment.
            if stock + held + sold + lent != added or min(held, sold, lent) < 0:
                found.bad_rows.append(
                    {
                        "phone_id": phone_id,
                        "stock": stock,
                        "held": held,
                        "sold": sold,
                        "lent": lent,
                        "added": added,
                    }
                )
            # Only a phone that is or was striped can have stripes (a recall clears the
            # mode once its last stripe host is gone, docs/escrow.md 5).
            if mode is not None or lent:
                striped.append(phone_id)
        await _recount_stripes(redis, found, striped)

    async for batch in _rows(
        redis, customers, last[customers], keys.customer, ["balance_cents", "added_cents"]
    ):
        for customer_id, (balance, added) in batch:
            if balance is None:
                found.dangling.append({"index": customers, "id": customer_id})
                continue
            balance, added = int(balance), int(added)
            totals["customers"] += 1
            totals["balance_cents"] += balance
            totals["added_cents"] += added
            if balance < 0:
                found.negative_balances.append(customer_id)
            if balance > added:
                found.bad_rows.append(
                    {"customer_id": customer_id, "balance": balance, "added": added}
                )

    # One bound for every status list: the partition's newest order at the start (its
    # seq clock), so an order that existed then is recounted whichever status list it
    # has moved to. Each list is walked chunk by chunk, oldest first (app/keys.py).
    newest = last[keys.orders_seq(partition)]
    fields = [ORDER_FIELDS[name] for name in _ORDER_ROW]
    for status in _WALK:
        async for chunk in _chunks(redis, partition, status, newest):
            async for batch in _rows(redis, chunk, newest, keys.order, fields):
                _recount_orders(found, partition, chunk, batch)


async def _chunks(redis: Redis, partition: int, status: str, newest: float) -> AsyncIterator[str]:
    """The keys of a status list's chunks that start by ``newest``, oldest first, from
    its directory (BATCH entries a round trip)."""
    if not newest:
        return
    directory = keys.order_chunks(partition, status)
    after = "-inf"
    while True:
        page = await redis.zrangebyscore(
            directory, after, newest, start=0, num=BATCH, withscores=True
        )
        if not page:
            return
        for chunk, _ in page:
            yield keys.orders_by_status(partition, status, int(chunk))
        after = f"({page[-1][1]!r}"


def _recount_orders(
    found: Recount, partition: int, index: str, batch: list[tuple[str, list[bytes | None]]]
) -> None:
    totals = found.partitions[partition]
    for order_id, (status, items, total, stripe) in batch:
        if status is None:
            found.dangling.append({"index": index, "id": order_id})
            continue
        status = status.decode()
        found.statuses[status] += 1
        if status not in ORDER_STATUSES:
            found.bad_rows.append({"order_id": order_id, "status": status})
            continue
        totals[f"orders_{status}"] += 1
        lines_total = units = 0
        keeps_money = status in MONEY_KEEPING_STATUSES
        # The stripes' host and epoch on an order sold from stripes (escrow).
        host, epoch = parse_stripe_mark(stripe.decode()) if stripe else (None, 0)
        for phone_id, quantity, unit_price in decode_items(items.decode()):
            units += quantity
            lines_total += quantity * unit_price
            if keeps_money:
                found.sold[phone_id] += quantity
                if host is not None:
                    found.stripe_lines.append((host, epoch, phone_id, quantity))
                else:
                    # The phone side of the ledger: its own partition's.
                    found.partitions[partition_of(phone_id)]["sold_units"] += quantity
        # The scripts store no total (the lines' sum is it): one stored by hand, or by an
        # older script, must agree.
        total = lines_total if total is None else int(total)
        if lines_total != total:
            found.bad_rows.append({"order_id": order_id, "total": total, "lines": lines_total})
        if keeps_money:
            totals[f"{status}_cents"] += int(total)
            totals[f"{status}_units"] += units


def _check(name: str, holds: str, how: str, ok: bool | None, **detail: Any) -> dict[str, Any]:
    """One line of the answer: what was checked, whether it holds at every
    moment or only at rest, how it was checked this time, and the verdict
    (None: not checked)."""
    return {"name": name, "holds": holds, "checked": how, "ok": ok, **detail}


def _kept(figures: dict[str, int] | Counter[str], unit: str) -> int:
    """The money (unit "cents") or units the orders keep, over every status that keeps them."""
    return sum(figures[f"{status}_{unit}"] for status in MONEY_KEEPING_STATUSES)


def _identities(ledger: dict[str, int]) -> bool:
    """One partition's: its customers' money, its phones' units (held: reserved by the
    saga, app/lua/reserve_stock.lua; lent: granted to stripes), and its stripes' units
    (escrow: stock + sold = received less shipped, every figure >= 0)."""
    money = ledger["balance_cents"] + _kept(ledger, "cents")
    units = (
        ledger["stock_units"] + ledger["held_units"] + ledger["sold_units"] + ledger["lent_units"]
    )
    stripes = ledger["stripe_units"] + ledger["stripe_sold_units"]
    stripe_figures = ("stripe_units", "stripe_sold_units", "received_units", "lent_units")
    return (
        money == ledger["added_cents"]
        and units == ledger["added_units"]
        and stripes == ledger["received_units"]
        and min(ledger[name] for name in stripe_figures) >= 0
    )


async def run_audit(redis: Redis) -> dict[str, Any]:
    began = time.monotonic()
    first = await read_start(redis)
    start, started_ms = first.ledger, first.at_ms
    found = await recount_rows(redis, first.last)
    end_ledgers, finished_ms = await _end(redis)
    end = dict(_sum(end_ledgers.values()))
    writes = end["changes"] - start["changes"]
    # Units held by the reservation saga belong to orders in motion: committed but not
    # settled yet (in the orders, not yet sold) or never to be (released soon). The
    # sold-against-orders equalities hold only once none is held (section 5 of
    # docs/data-tier.md), so rest also means nothing held at start and at end.
    held = max(start["held_units"], end["held_units"])
    # Escrow: a closed stripe's units on their way home are in no pool and no stripe.
    shipping = sum(1 for p in range(PARTITIONS) if first.last[keys.shipments_due(p)])
    at_rest = writes == 0 and held == 0 and shipping == 0
    totals = found.totals
    # Rows but no ledger: written before the ledger existed (or it was deleted).
    ledger_missing = any(
        not first.present[p] and any(found.partitions[p].values()) for p in range(PARTITIONS)
    )

    # Escrow at rest (docs/escrow.md, section 8): a phone's units not in its pool nor in
    # an order are in its stripes' stock, its pool's lent units are its stripes' got, and
    # its stripes' sold units are those of the live orders sold from them.
    stripe_stock: Counter[str] = Counter()
    stripe_got: Counter[str] = Counter()
    stripe_sold: Counter[str] = Counter()
    for (_, phone_id), (stock, sold, got, _) in found.stripes.items():
        stripe_stock[phone_id] += stock
        stripe_got[phone_id] += got
        stripe_sold[phone_id] += sold
    mismatched_phones = [
        {
            "phone_id": phone_id,
            "stock": stock,
            "sold": found.sold[phone_id],
            "added": added,
            **(
                {
                    "lent": found.lent[phone_id],
                    "stripe_stock": stripe_stock[phone_id],
                    "stripe_got": stripe_got[phone_id],
                    "stripe_sold": stripe_sold[phone_id],
                    "stripe_sold_in_orders": found.stripe_sold[phone_id],
                }
                if found.lent[phone_id] or stripe_got[phone_id] or found.stripe_sold[phone_id]
                else {}
            ),
        }
        for phone_id, (stock, added) in found.phone_rows.items()
        if stock + found.sold[phone_id] + stripe_stock[phone_id] != added
        or found.lent[phone_id] != stripe_got[phone_id]
        or stripe_sold[phone_id] != found.stripe_sold[phone_id]
    ]
    recount_money_ok = totals["balance_cents"] + _kept(totals, "cents") == totals["added_cents"]
    ledger_fields = [name for name in LEDGER_FIELDS if name != "changes"]
    if at_rest:
        # Partition by partition: a figure moved from one partition's ledger to
        # another's would leave the sums equal.
        differing = {
            name: {"ledger": start[name], "recount": totals[name]}
            for name in ledger_fields
            if any(first.ledgers[p][name] != found.partitions[p][name] for p in range(PARTITIONS))
        }
        recount_check = _check(
            "recount_equals_ledger", "at_rest", "exact", not differing, differing=differing
        )
        stock_check = _check(
            "every_phone_stock_plus_sold_equals_added",
            "at_rest",
            "exact",
            not mismatched_phones,
        )
        money_check = _check(
            "recount_balances_plus_orders_equal_added", "at_rest", "exact", recount_money_ok
        )
    else:
        outside = {
            name: {
                "ledger_at_start": start[name],
                "recount": totals[name],
                "ledger_at_end": end[name],
            }
            for name in sorted(GROWING)
            if not start[name] <= totals[name] <= end[name]
        }
        recount_check = _check(
            "recount_equals_ledger",
            "at_rest",
            "bounds: totals that only grow lie between the ledger at start and at end",
            not outside,
            differing=outside,
        )
        not_at_rest = (
            f"{writes} writes during the recount"
            if writes
            else f"{held} units held by reservations (the saga's orders in motion)"
            if held
            else f"shipments due on {shipping} stripe host partition(s) (units on their way home)"
        )
        stock_check = _check(
            "every_phone_stock_plus_sold_equals_added", "at_rest", not_at_rest, None
        )
        money_check = _check(
            "recount_balances_plus_orders_equal_added", "at_rest", not_at_rest, None
        )
        mismatched_phones = []
    ledger_check = _check(
        "ledger_balances_plus_orders_equal_added",
        "always",
        "exact, partition by partition, at start and at end",
        all(
            _identities(first.ledgers[p]) and _identities(end_ledgers[p]) for p in range(PARTITIONS)
        ),
    )
    if ledger_missing:
        # Nothing to hold the rows against: say so once, not as 14 differences.
        not_checked = "not checked: ledger missing"
        ledger_check = _check(ledger_check["name"], "always", not_checked, None)
        recount_check = _check(recount_check["name"], "at_rest", not_checked, None, differing={})
    presence_check = _check(
        "ledger_present",
        "always",
        "exact: the ledger exists whenever a row does",
        not ledger_missing,
        **({"detail": LEDGER_MISSING} if ledger_missing else {}),
    )
    checks = [
        presence_check,
        ledger_check,
        _check(
            "no_negative_stock_or_balance",
            "always",
            "exact, row by row",
            not found.negative_stock and not found.negative_balances,
        ),
        _check(
            "rows_consistent",
            "always",
            "exact, row by row",
            not found.bad_rows,
            rows=found.bad_rows,
        ),
        _check("no_dangling_index_entries", "always", "exact, row by row", not found.dangling),
        recount_check,
        stock_check,
        money_check,
    ]
    # "ok" is False only for a check that ran and failed; a check skipped
    # under load says so in "checks" (ok: null) and leaves "at_rest" false.
    stock_ok = bool(ledger_check["ok"] and recount_check["ok"] and stock_check["ok"] is not False)
    money_ok = bool(ledger_check["ok"] and recount_check["ok"] and money_check["ok"] is not False)
    return {
        "ok": all(check["ok"] is not False for check in checks),
        "at_rest": at_rest,
        "started_at": iso_time(started_ms),
        "finished_at": iso_time(finished_ms),
        # At rest, every figure below is the shop as of finished_at (nothing
        # moved since started_at); otherwise each row was read somewhere between.
        "as_of": iso_time(finished_ms) if at_rest else None,
        "seconds": round(time.monotonic() - began, 3),
        "writes_during": writes,
        "checks": checks,
        "ledger": {
            "present": not ledger_missing,
            **({"missing": LEDGER_MISSING} if ledger_missing else {}),
            "at_start": start,
            "at_end": end,
        },
        "stock": {
            "ok": stock_ok,
            "phones": totals["phones"],
            "stock_units": totals["stock_units"],
            "sold_units": _kept(totals, "units"),
            "added_units": totals["added_units"],
            # Escrow: units the pools lent to stripes, and those of them still in stripes.
            "lent_units": totals["lent_units"],
            "stripe_units": totals["stripe_units"],
            "mismatches": mismatched_phones,
        },
        "money": {
            "ok": money_ok,
            "customers": totals["customers"],
            "balances_cents": totals["balance_cents"],
            "live_order_totals_cents": _kept(totals, "cents"),
            "added_cents": totals["added_cents"],
        },
        "negative_stock": found.negative_stock,
        "negative_balances": found.negative_balances,
        "dangling_index_entries": found.dangling,
        "orders": {
            "total": sum(found.statuses.values()),
            **{status: found.statuses[status] for status in ORDER_STATUSES},
        },
    }
