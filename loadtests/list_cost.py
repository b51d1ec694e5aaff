"""What a page of the order lists costs on layout 7 (status lists in chunks) against layout 6
(one zset per partition and status) and layout 4 (an index of all orders beside them), in
one run on one redis-server:

    python -m loadtests.list_cost --rows 200000

Layout 5 dropped the all-orders indexes (docs/data-tier.md 10.1), so a list without a
status filter merges the status indexes (app/paging.py): the admin's all orders read
3 x 128 indexes instead of 128, a customer's its 3 instead of one ZREVRANGE by rank.
This fills every form side by side (the layout-4 and layout-6 indexes by the names they
had, which app/keys.py no longer builds; layout 7's status chunks as the scripts write
them), then pages through each with the app's own paging code, alternating the forms'
rounds (D, layout 7's admin lists, as app/status_lists.py reads them, beside B, layout
6's): Redis commands and round trips per page, and CPU per page of this process and of redis-server. Two sizes (a tenth of the
rows, then all), so a cost that does not grow with the data shows as equal; the
customer has CUSTOMER_ORDERS orders at both. Only the index reads are measured: the
page's hashes are the same either way. A customer's pages have a third form, C: the same
status indexes merged by one read-only script (app/slot_paging.py, what the app runs),
beside B, the merge over round trips it replaced, in the same rounds.

Traffic goes only to 127.0.0.1, to a redis-server this module starts on a free port in
a temp folder and stops.
"""

from __future__ import annotations

import asyncio
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from app import keys
from app.ops.redis_cluster import free_ports
from app.paging import merged_lists_page, merged_page
from app.partitions import PARTITION_TAGS, PARTITIONS, new_id
from app.redis_gateway import RedisGateway
from app.slot_paging import SLOT_PAGE, slot_merged_page
from app.status_lists import StatusLists
from app.vocabulary import ORDER_STATUSES
from loadtests.datatier import standalone
from loadtests.support.cli import measurement_parser, publish
from loadtests.support.round_trips import CountingTransport

# A shop's orders are mostly completed: open and cancelled ones are a tenth each.
STATUS_WEIGHTS = (1, 8, 1)
CUSTOMER_ORDERS = 2_000  # the customer whose own list is paged
PAGE = 10
DEEP_OFFSET = 1_500  # past HEAD_LIMIT: a deep page bisects on scores
ROUNDS = 3


def _all_orders(partition: int) -> str:
    """Layout 4's index of all orders of a partition (app/keys.py names it no more)."""
    return f"oa{{{PARTITION_TAGS[partition]}}}"


def _customer_all_orders(customer_id: str, partition: int) -> str:
    return f"co{{{PARTITION_TAGS[partition]}}}{customer_id}"


def _status_index(partition: int, status: str) -> str:
    """Layout 6's one zset per partition and status (app/keys.py names it no more)."""
    return f"os{{{PARTITION_TAGS[partition]}}}{status}"


class _Chunks:
    """Layout 7's status chunks of every partition as place_order.lua writes them: orders
    in seq order per partition, CHUNK_ORDERS to a chunk, with the directories, counts,
    chunk starts, the ledger's order counts (the lists' totals) and the clocks."""

    def __init__(self) -> None:
        self.placed = [0] * PARTITIONS
        self.starts: dict[tuple[int, int], int] = {}
        self.filled: set[tuple[int, str, int]] = set()

    def add(self, pipe: Any, partition: int, seq: int, order_id: str, status: str) -> None:
        k = self.placed[partition] // keys.CHUNK_ORDERS
        self.placed[partition] += 1
        start = self.starts.setdefault((partition, k), seq)
        pipe.zadd(keys.orders_by_status(partition, status, k), {order_id: seq})
        if (partition, status, k) not in self.filled:
            self.filled.add((partition, status, k))
            pipe.zadd(keys.order_chunks(partition, status), {str(k): start})
        counts = keys.order_chunk_counts(partition, status)
        pipe.hincrby(counts, str(k), 1)
        pipe.hincrby(counts, f"g{k // keys.CHUNK_GROUP}", 1)
        pipe.hincrby(keys.ledger(partition), f"orders_{status}", 1)
        placed_in_chunk = self.placed[partition] - k * keys.CHUNK_ORDERS
        pipe.set(keys.orders_seq(partition), keys.order_clock(seq, k, placed_in_chunk))


async def fill(
    redis: Redis, start: int, stop: int, customer_id: str, seed: int, chunks: _Chunks
) -> None:
    """Orders ``start..stop-1`` in every form, spread over the partitions; with the first
    rows, the customer's CUSTOMER_ORDERS (in partition 0, older than the others: a
    partition's orders enter its chunks in seq order)."""
    rng = random.Random(seed)
    base = 1_764_600_000_000_000

    def add(pipe: Any, partition: int, seq: int, customer: bool) -> None:
        order_id = new_id(partition)
        status = rng.choices(ORDER_STATUSES, weights=STATUS_WEIGHTS)[0]
        pipe.zadd(_all_orders(partition), {order_id: seq})
        pipe.zadd(_status_index(partition, status), {order_id: seq})
        chunks.add(pipe, partition, seq, order_id, status)
        if customer:
            pipe.zadd(_customer_all_orders(customer_id, partition), {order_id: seq})
            pipe.zadd(keys.customer_orders_by_status(customer_id, status), {order_id: seq})

    async with redis.pipeline(transaction=False) as pipe:
        if start == 0:
            for j in range(CUSTOMER_ORDERS):
                add(pipe, 0, base - PARTITIONS * (CUSTOMER_ORDERS - j), customer=True)
        for i in range(start, stop):
            add(pipe, i % PARTITIONS, base + i, customer=False)
            if i % 5_000 == 4_999:
                await pipe.execute()
        await pipe.execute()


async def _by_rank(gateway: RedisGateway, index: str, offset: int) -> list[bytes]:
    """Layout 4's customer list: ZCARD and ZREVRANGE by rank (app/paging.py:
    page_of_hashes without the hashes)."""
    _, ids = await gateway.execute_many(
        [("ZCARD", index), ("ZREVRANGE", index, offset, offset + PAGE - 1)]
    )
    return ids


async def _redis_cpu(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def measure_page(
    redis: Redis, read: Callable[[RedisGateway], Awaitable[list[bytes]]], pages: int
) -> dict[str, Any]:
    """``pages`` reads of one page: commands and round trips of one, CPU per page."""
    transport = CountingTransport(redis)
    gateway = RedisGateway(transport)
    members = await read(gateway)
    per_page = (transport.round_trips, transport.commands)
    redis_before, own_before = await _redis_cpu(redis), time.process_time()
    for _ in range(pages):
        assert await read(gateway) == members
    own = (time.process_time() - own_before) / pages
    redis_cpu = (await _redis_cpu(redis) - redis_before) / pages
    return {
        "round_trips": per_page[0],
        "commands": per_page[1],
        "app_cpu_us": own * 1e6,
        "redis_cpu_us": redis_cpu * 1e6,
        "members": members,
    }


# The forms a page is read in: A layout 4's all-orders index, B the status indexes merged
# over round trips (app/paging.py), C a customer's status indexes merged in one script.
LAYOUT_4, MERGED, ONE_SCRIPT = "layout 4", "layout 6", "layout 6, one script"
# D: layout 7's admin lists, the same status lists in chunks (app/status_lists.py), merged
# over round trips; a customer's own indexes are the same in layouts 6 and 7.
CHUNKED = "layout 7"


def _cases(customer_id: str) -> dict[str, tuple[dict[str, Callable], int]]:
    """Name -> (form -> its read, pages per round)."""
    all_orders = [_all_orders(p) for p in range(PARTITIONS)]
    # Partition-major, as app/orders/service.py lists them.
    pairs = [(p, s) for p in range(PARTITIONS) for s in ORDER_STATUSES]
    statuses = [_status_index(p, s) for p, s in pairs]
    own_all = _customer_all_orders(customer_id, 0)
    own_statuses = [keys.customer_orders_by_status(customer_id, s) for s in ORDER_STATUSES]

    def merged(indexes: list[str], offset: int) -> Callable:
        async def read(gateway: RedisGateway) -> list[bytes]:
            _, members = await merged_page(gateway, indexes, offset, PAGE, newest_first=True)
            return members

        return read

    def chunked(offset: int) -> Callable:
        async def read(gateway: RedisGateway) -> list[bytes]:
            lists = StatusLists(pairs)
            _, members = await merged_lists_page(gateway, lists, offset, PAGE, newest_first=True)
            return members

        return read

    def ranked(offset: int) -> Callable:
        return lambda gateway: _by_rank(gateway, own_all, offset)

    def one_script(offset: int) -> Callable:
        async def read(gateway: RedisGateway) -> list[bytes]:
            _, members = await slot_merged_page(gateway, own_statuses, offset, PAGE)
            return members

        return read

    def customer(offset: int) -> dict[str, Callable]:
        return {
            LAYOUT_4: ranked(offset),
            MERGED: merged(own_statuses, offset),
            ONE_SCRIPT: one_script(offset),
        }

    return {
        "admin, all orders, page 1": (
            {LAYOUT_4: merged(all_orders, 0), MERGED: merged(statuses, 0), CHUNKED: chunked(0)},
            60,
        ),
        f"admin, all orders, offset {DEEP_OFFSET}": (
            {
                LAYOUT_4: merged(all_orders, DEEP_OFFSET),
                MERGED: merged(statuses, DEEP_OFFSET),
                CHUNKED: chunked(DEEP_OFFSET),
            },
            4,
        ),
        "a customer's orders, page 1": (customer(0), 400),
        f"a customer's orders, offset {DEEP_OFFSET}": (customer(DEEP_OFFSET), 40),
    }


def _ratio(row: dict[str, Any], after: str, before: str, cost: str) -> float:
    return round(row[after][cost] / max(row[before][cost], 0.1), 2)


async def measure(redis: Redis, customer_id: str) -> dict[str, Any]:
    """Each case: its forms alternated ROUNDS times; the medians, and the ratios B/A
    (and for a customer's pages C/A and C/B)."""
    out: dict[str, Any] = {}
    for name, (forms, pages) in _cases(customer_id).items():
        runs: dict[str, list[dict[str, Any]]] = {form: [] for form in forms}
        for _ in range(ROUNDS):
            for form, read in forms.items():
                runs[form].append(await measure_page(redis, read, pages))
        # The same rows every way: every form lists the same orders in the same order.
        first = [runs[form][0]["members"] for form in forms]
        assert all(members == first[0] for members in first), name
        row: dict[str, Any] = {}
        for form in forms:
            row[form] = {
                "round_trips": runs[form][0]["round_trips"],
                "commands": runs[form][0]["commands"],
                **{
                    k: round(statistics.median(r[k] for r in runs[form]), 1)
                    for k in ("app_cpu_us", "redis_cpu_us")
                },
            }
        pairs = [(MERGED, LAYOUT_4, "")]
        if CHUNKED in forms:
            pairs.append((CHUNKED, MERGED, "chunks_vs_merge_"))
        if ONE_SCRIPT in forms:
            pairs += [
                (ONE_SCRIPT, LAYOUT_4, "script_vs_layout_4_"),
                (ONE_SCRIPT, MERGED, "script_vs_merge_"),
            ]
        for after, before, prefix in pairs:
            for cost in ("app_cpu", "redis_cpu"):
                row[f"{prefix}{cost}_ratio"] = _ratio(row, after, before, f"{cost}_us")
        out[name] = row
    return out


async def run(directory: Path, rows: int) -> dict[str, Any]:
    port = free_ports(1)[0]
    server = standalone(directory, port)
    redis = Redis(host="127.0.0.1", port=port)
    customer_id = new_id(0)
    result: dict[str, Any] = {"rows": rows, "customer_orders": CUSTOMER_ORDERS}
    try:
        # Loaded before the first read, whose round trips are the ones counted.
        await redis.script_load(SLOT_PAGE.source)
        filled, chunks = 0, _Chunks()
        for size in (rows // 10, rows):
            await fill(redis, filled, size, customer_id, seed=size, chunks=chunks)
            filled = size
            result[str(size)] = await measure(redis, customer_id)
    finally:
        await redis.aclose()
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = measurement_parser("list_cost", __doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args(argv)
    if args.rows // 10 < 2 * DEEP_OFFSET:
        parser.error(f"--rows must be at least {20 * DEEP_OFFSET}: a tenth of it is paged deep")
    with tempfile.TemporaryDirectory(prefix="list-cost-") as tmp:
        result = asyncio.run(run(Path(tmp), args.rows))
    return publish(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
