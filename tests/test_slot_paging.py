"""A customer's orders without a status filter in one round trip at any depth
(app/slot_paging.py, app/lua/slot_page.lua): every page is exactly the slice of the
newest-first merge of its status indexes, near the head (plain reads) and past
app/paging.py's HEAD_LIMIT (the script), on one redis-server and on the cluster (one
slot, one round trip); the plain head and the script's head answer alike; and the
script's own work is bounded by the offset, whatever the number of rows."""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from app import keys
from app.cluster_gateway import open_cluster_gateway
from app.ops.redis_cluster import LocalCluster
from app.orders import service as orders_service
from app.paging import HEAD_LIMIT, merged_page
from app.partitions import new_id
from app.query import Page
from app.redis_gateway import RedisGateway, gateway_over
from app.slot_paging import HEAD_ROWS, SLOT_PAGE, slot_merged_page
from app.vocabulary import ORDER_STATUSES, encode_items, stored_order_fields
from loadtests.support.round_trips import CountingTransport
from tests.helpers import CLUSTER, ON_BOTH_STACKS

PARTITION = 5
# A day of one partition's clock, in microseconds.
DAY_START, DAY_US = 1_700_000_000_000_000, 86_400 * 10**6
# The commands slot_page.lua may call (INFO commandstats counts those a script runs).
SCRIPT_COMMANDS = ("zcard", "zcount", "zrevrange")

_Row = tuple[int, int, bytes]  # (score, the index's place in the list, member)


class Counting:
    """Any gateway transport, its round trips and commands counted."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.round_trips = self.commands = 0

    async def execute(self, *args: Any) -> Any:
        self.round_trips += 1
        self.commands += 1
        return await self.inner.execute(*args)

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        self.round_trips += 1
        self.commands += len(commands)
        return await self.inner.execute_many(commands)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
async def gateway(
    request: pytest.FixtureRequest, stack_kind: str, redis: Redis
) -> AsyncIterator[RedisGateway]:
    """The app's own gateway of the tier, its transport counted: on the cluster the
    ClusterGateway (EVALSHA routed by the keys' slot)."""
    if stack_kind == CLUSTER:
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        nodes = tuple(("127.0.0.1", port) for port in cluster.ports[:3])
        opened: RedisGateway = open_cluster_gateway("redis://127.0.0.1/0", nodes, 1, 1000, 5.0, 8)
    else:
        opened = gateway_over(redis)
    opened.transport = Counting(opened.transport)
    yield opened
    await opened.aclose()


def _indexes(customer: str) -> list[str]:
    return [keys.customer_orders_by_status(customer, status) for status in ORDER_STATUSES]


async def _fill(redis: Redis, indexes: list[str], rows: int, seed: int, span: int) -> list[_Row]:
    """``rows`` orders over the status indexes, mostly completed as a shop's are, scores
    drawn from ``span`` microseconds: unique when it is wide, as one partition's clock
    gives them; with repeats (within and across indexes) when it is narrow."""
    rng = random.Random(seed)
    stored = []
    async with redis.pipeline(transaction=False) as pipe:
        for _ in range(rows):
            place = rng.choices(range(len(indexes)), weights=(1, 8, 1))[0]
            score = DAY_START + rng.randrange(span)
            member = new_id(PARTITION).encode()
            pipe.zadd(indexes[place], {member: score})
            stored.append((score, place, member))
        await pipe.execute()
    return stored


def _newest_first(stored: list[_Row]) -> list[bytes]:
    """The reference: the exact reverse of ascending (score, place, member)."""
    return [member for _, _, member in sorted(stored, reverse=True)]


@ON_BOTH_STACKS
async def test_every_page_is_the_slice_of_the_merge_in_one_round_trip(
    redis: Redis, gateway: RedisGateway
) -> None:
    indexes = _indexes(new_id(PARTITION))
    rows = 3_000
    stored = await _fill(redis, indexes, rows, seed=17, span=DAY_US)
    assert len({score for score, _, _ in stored}) == rows  # unique, as seqs are
    expected = _newest_first(stored)
    # 31, 32: where the plain head reads stop and the script (probing) starts.
    head = [0, 1, 9, 31, 32, HEAD_LIMIT - 1, HEAD_LIMIT, HEAD_LIMIT + 1]
    offsets = [*head, 1234, 2990, 2999, 3000, 10**6]
    counting: Any = gateway.transport
    # Loads the script where it is not yet.
    await slot_merged_page(gateway, indexes, HEAD_ROWS, 1)
    for offset in offsets:
        for count in (1, 10, 100):
            counting.round_trips = counting.commands = 0
            total, members = await slot_merged_page(gateway, indexes, offset, count)
            assert total == rows
            assert members == expected[offset : offset + count], (offset, count)
            # Below HEAD_ROWS: a ZCARD and a ZREVRANGE per index; else one EVALSHA.
            commands = 2 * len(indexes) if offset < HEAD_ROWS else 1
            assert (counting.round_trips, counting.commands) == (1, commands), (offset, count)


async def test_the_same_pages_as_the_merge_over_round_trips(redis: Redis) -> None:
    """The script and app/paging.py's merge (what the customer's list used before) answer
    the same page at every depth, for unique scores."""
    indexes = _indexes(new_id(PARTITION))
    await _fill(redis, indexes, 2_000, seed=5, span=DAY_US)
    gateway = RedisGateway(CountingTransport(redis))
    for offset in (0, 3, 500, 510, 520, 1500, 1995, 2000):
        assert await slot_merged_page(gateway, indexes, offset, 10) == await merged_page(
            gateway, indexes, offset, 10, newest_first=True
        ), offset


async def test_equal_scores_keep_one_exact_order(redis: Redis) -> None:
    """Scores repeat within and across the indexes (not so for seqs, but the script
    must not lose or repeat a row if they do): the reverse of ascending (score, the
    index's place, member), at every offset."""
    indexes = _indexes(new_id(PARTITION))
    stored = await _fill(redis, indexes, 600, seed=3, span=150)
    expected = _newest_first(stored)
    gateway = RedisGateway(CountingTransport(redis))
    for offset in range(0, 601, 7):
        assert await slot_merged_page(gateway, indexes, offset, 9) == (
            600,
            expected[offset : offset + 9],
        ), offset


async def test_the_plain_head_and_the_scripts_head_answer_alike(redis: Redis) -> None:
    """Below HEAD_ROWS the app merges the heads itself; the script, asked the same page,
    answers the same, equal scores included (in either order of the indexes' places)."""
    indexes = _indexes(new_id(PARTITION))
    await _fill(redis, indexes, 300, seed=11, span=40)
    gateway = RedisGateway(CountingTransport(redis))
    for offset in range(HEAD_ROWS):
        for count in (1, 7, 50):
            script_total, script_members = await gateway.run_read_script(
                SLOT_PAGE, indexes, [offset, count]
            )
            assert await slot_merged_page(gateway, indexes, offset, count) == (
                int(script_total),
                list(script_members),
            ), (offset, count)


async def test_no_orders_one_status_only_and_past_the_end(redis: Redis) -> None:
    indexes = _indexes(new_id(PARTITION))
    gateway = RedisGateway(CountingTransport(redis))
    assert await slot_merged_page(gateway, indexes, 0, 10) == (0, [])
    await redis.zadd(indexes[2], {b"x": DAY_START, b"y": DAY_START + 5})
    assert await slot_merged_page(gateway, indexes, 0, 10) == (2, [b"y", b"x"])
    assert await slot_merged_page(gateway, indexes, 1, 10) == (2, [b"x"])
    assert await slot_merged_page(gateway, indexes, 2, 10) == (2, [])


async def _script_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in SCRIPT_COMMANDS)


@pytest.mark.parametrize("offset", [0, 7, HEAD_LIMIT - 1, HEAD_LIMIT, 1234, 1499])
async def test_a_page_costs_one_round_trip_and_work_bounded_by_its_offset(
    redis: Redis, offset: int
) -> None:
    """1,500 and 15,000 orders over the same day: one round trip and one command for the
    page either way, and the commands the script runs inside stay within a bound of the
    offset alone (slot_page.lua's header: each index's range of ranks, at most offset+1
    wide, halves at each probe of it), far from the rows it skips."""
    k = len(ORDER_STATUSES)
    bound = k + k * k * (math.floor(math.log2(offset + 1)) + 1) + k
    for rows in (1_500, 15_000):
        await redis.flushall()
        indexes = _indexes(new_id(PARTITION))
        stored = await _fill(redis, indexes, rows, seed=rows, span=DAY_US)
        transport = CountingTransport(redis)
        gateway = RedisGateway(transport)
        # The script itself, at every offset (the app reads offsets below HEAD_ROWS plainly).
        await gateway.run_read_script(SLOT_PAGE, indexes, [0, 1])  # loads it
        transport.round_trips = transport.commands = 0
        await redis.config_resetstat()
        reply = await gateway.run_read_script(SLOT_PAGE, indexes, [offset, 10])
        total, members = int(reply[0]), list(reply[1])
        calls = await _script_calls(redis)
        assert (total, members) == (rows, _newest_first(stored)[offset : offset + 10])
        assert (transport.round_trips, transport.commands) == (1, 1)
        assert k <= calls <= bound, (rows, calls, bound)


async def test_a_customers_list_is_the_script_then_the_hashes(redis: Redis) -> None:
    """app/orders/service.py: a customer's list without a status, deep past HEAD_LIMIT, is
    2 round trips (slot_page.lua, then the page's hashes), the orders newest first."""
    customer = new_id(PARTITION)
    indexes = _indexes(customer)
    stored = await _fill(redis, indexes, 700, seed=9, span=DAY_US)
    async with redis.pipeline(transaction=False) as pipe:
        for score, place, member in stored:
            order = {
                "customer_id": customer,
                "status": ORDER_STATUSES[place],
                "items": encode_items([(new_id(0), 1, 100)]),
                "total_cents": "100",
                "seq": str(score),
                "created_at": str(score // 1000),
            }
            pipe.hset(keys.order(member.decode()), mapping=stored_order_fields(order))
        await pipe.execute()
    transport = CountingTransport(redis)
    gateway = RedisGateway(transport)
    page = Page(page=60, per_page=10)  # offset 590
    # Loads the script where it is not yet.
    await slot_merged_page(gateway, indexes, HEAD_ROWS, 1)
    transport.round_trips = transport.commands = 0
    total, orders = await orders_service.list_orders(
        gateway, page, customer_id=customer, status=None
    )
    assert total == 700
    assert [order.id.encode() for order in orders] == _newest_first(stored)[590:600]
    assert transport.round_trips == 2 and transport.commands == 1 + 10
