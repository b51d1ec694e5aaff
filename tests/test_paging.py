"""Lists over the 128 partitions (app/paging.py): every page is the slice of one merged,
ordered list, near the head and deep into it, with ties across partitions; and a page
costs the same commands whatever the number of rows. The catalogue's pages remembered
per worker (app/phones/page_cache.py) cost one round trip until a phone is created."""

from __future__ import annotations

import random

import pytest
from redis.asyncio import Redis

from app import keys
from app.paging import HEAD_LIMIT, merged_page
from app.partitions import PARTITIONS, new_id
from app.phones import service as phones
from app.phones.models import PhoneCreate
from app.phones.page_cache import CataloguePages
from app.query import Page
from app.redis_gateway import ClientTransport, RedisGateway, gateway_over
from app.scripts import Scripts
from app.vocabulary import ORDER_STATUSES
from loadtests.support.round_trips import CountingTransport

INDEXES = [keys.phones(p) for p in range(PARTITIONS)]


async def _fill(
    redis: Redis, rows: int, seed: int, span: int | None = None
) -> list[tuple[int, int, bytes]]:
    """Rows spread unevenly (a third in partition 7, a few partitions empty), scores
    unique within a partition, within ``span`` (default: twice the rows, so that
    scores often tie across partitions). Returns (score, partition, member) for each."""
    rng = random.Random(seed)
    stored = []
    used: set[tuple[int, int]] = set()
    members: dict[int, dict[bytes, int]] = {}
    for _ in range(rows):
        partition = 7 if rng.random() < 0.33 else rng.randrange(PARTITIONS - 5)
        score = 1_700_000_000_000_000 + rng.randrange(span or rows * 2)
        while (partition, score) in used:
            score += 1
        used.add((partition, score))
        member = new_id(partition).encode()
        members.setdefault(partition, {})[member] = score
        stored.append((score, partition, member))
    # One ZADD per index (not per row): the same sets, written in a fraction of the time.
    async with redis.pipeline(transaction=False) as pipe:
        for partition, scores in members.items():
            pipe.zadd(INDEXES[partition], scores)
        await pipe.execute()
    return stored


def _expected(stored: list[tuple[int, int, bytes]], newest_first: bool) -> list[bytes]:
    ordered = sorted(stored, key=lambda row: (row[0], row[1]), reverse=newest_first)
    return [member for _, _, member in ordered]


@pytest.mark.parametrize("newest_first", [False, True], ids=["oldest_first", "newest_first"])
async def test_every_page_is_a_slice_of_the_merged_list(redis: Redis, newest_first: bool) -> None:
    stored = await _fill(redis, 3000, seed=11)
    expected = _expected(stored, newest_first)
    gateway = RedisGateway(ClientTransport.on_pool(redis.connection_pool))
    offsets = [0, 1, 9, 100, HEAD_LIMIT - 10, HEAD_LIMIT - 9, HEAD_LIMIT, 1234, 2990, 2999, 3000]
    for offset in offsets:
        for count in (1, 10, 100):
            total, members = await merged_page(
                gateway, INDEXES, offset, count, newest_first=newest_first
            )
            assert total == 3000
            assert members == expected[offset : offset + count], (offset, count)


async def test_an_empty_list_and_a_page_past_its_end(redis: Redis) -> None:
    gateway = RedisGateway(ClientTransport.on_pool(redis.connection_pool))
    assert await merged_page(gateway, INDEXES, 0, 10, newest_first=False) == (0, [])
    assert await merged_page(gateway, INDEXES, 10**6, 10, newest_first=True) == (0, [])
    await _fill(redis, 20, seed=3)
    assert await merged_page(gateway, INDEXES, 10**6, 10, newest_first=True) == (20, [])


@pytest.mark.parametrize("offset", [0, 2000], ids=["head", "deep"])
async def test_a_page_costs_the_same_with_50_times_the_rows(redis: Redis, offset: int) -> None:
    """The same round trips and commands for 3,000 and 150,000 rows (what the list-cost
    ratio of make bench measures in time), over the same hour of scores: the bisection
    of a deep page takes a probe per bit of the span of scores, not of the row count."""
    costs = []
    for rows in (3_000, 150_000):
        await redis.flushall()
        stored = await _fill(redis, rows, seed=rows, span=3_600 * 10**6)
        transport = CountingTransport(redis)
        total, members = await merged_page(
            RedisGateway(transport), INDEXES, offset, 10, newest_first=True
        )
        assert total == rows and members == _expected(stored, True)[offset : offset + 10]
        costs.append((transport.round_trips, transport.commands))
    (trips_small, commands_small), (trips_large, commands_large) = costs
    # Within one probe (the bisection's bounds differ by a few microseconds) and a
    # few reads past a partition's first rows (depending on where the rows fell).
    assert abs(trips_large - trips_small) <= 1
    assert abs(commands_large - commands_small) <= PARTITIONS + 16
    if offset == 0:
        assert trips_small <= 3 and commands_small <= 2 * PARTITIONS + 16


async def test_a_customers_status_indexes_merge_into_its_whole_list(redis: Redis) -> None:
    """A customer's orders without a status filter (layout 5 keeps no index of all of
    them): its status indexes, one partition, scores unique across them, merged near the
    head and by bisection deeper, page cost the same for 1,500 orders and for 15,000."""
    customer = new_id(5)
    indexes = [keys.customer_orders_by_status(customer, s) for s in ORDER_STATUSES]
    costs = []
    for rows in (1_500, 15_000):
        await redis.flushall()
        rng = random.Random(rows)
        # Unique scores over a day, as one partition's clock gives them.
        scores = rng.sample(range(1_700_000_000_000_000, 1_700_086_400_000_000), rows)
        stored = []
        async with redis.pipeline(transaction=False) as pipe:
            for score in scores:
                member = new_id(5).encode()
                # Most orders completed, some open or cancelled, as a shop's are.
                index = rng.choices(range(len(indexes)), weights=(1, 8, 1))[0]
                pipe.zadd(indexes[index], {member: score})
                stored.append((score, index, member))
            await pipe.execute()
        expected = [member for _, _, member in sorted(stored, reverse=True)]
        transport = CountingTransport(redis)
        gateway = RedisGateway(transport)
        for offset in (0, 7, HEAD_LIMIT - 10, HEAD_LIMIT + 3, rows // 2, rows - 10, rows - 1):
            total, members = await merged_page(gateway, indexes, offset, 10, newest_first=True)
            assert total == rows and members == expected[offset : offset + 10], offset
        costs.append(transport.round_trips)
    # The bisection's probes follow the span of the scores (a day here), not the rows.
    assert abs(costs[0] - costs[1]) <= 7


async def test_a_remembered_catalogue_page_is_one_round_trip(redis: Redis) -> None:
    """GET /phones' pages (app/phones/page_cache.py): once merged, a page costs one round
    trip (the 128 clocks in one MGET and the page's hashes) whatever the catalogue's size,
    until a phone is created; the next read then merges again and has it."""
    scripts = Scripts(gateway_over(redis))
    created = [
        await phones.create_phone(scripts, PhoneCreate(name=f"p{i}", price_cents=100))
        for i in range(25)
    ]
    transport = CountingTransport(redis)
    gateway, pages = RedisGateway(transport), CataloguePages()
    last_page = Page(page=3, per_page=10)

    async def ids(page: Page) -> tuple[int, list[str]]:
        total, rows = await pages.page(gateway, page)
        return total, [row["id"] for row in rows]

    assert await ids(last_page) == (25, [phone.id for phone in created[20:]])
    merged = transport.round_trips
    assert merged >= 3  # the clocks, the merge (2 or 3), the rows
    transport.round_trips = transport.commands = 0
    assert await ids(last_page) == (25, [phone.id for phone in created[20:]])
    assert (transport.round_trips, transport.commands) == (1, 1 + 5)
    assert pages.hits == 1 and pages.merges == 1

    created.append(await phones.create_phone(scripts, PhoneCreate(name="new", price_cents=1)))
    assert await ids(last_page) == (26, [phone.id for phone in created[20:]])
    assert pages.hits == 1 and pages.merges == 2
