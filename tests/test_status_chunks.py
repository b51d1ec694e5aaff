"""A partition's status lists in chunks (layout 7, app/keys.py, docs/data-tier.md 10.2):
orders enter the partition's current chunk, CHUNK_ORDERS to a chunk; an order id carries
the chunk it was minted for and a script refuses keys of another chunk, writing nothing;
the lists read through the chunks' directories equal a plain sorted list, at a page cost
that does not grow with the data."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from app import keys
from app.auth import Principal
from app.cluster_gateway import open_cluster_gateway
from app.ops.redis_cluster import LocalCluster
from app.orders import saga_service, service
from app.orders.chunk_hints import ChunkHints
from app.paging import HEAD_LIMIT, merged_lists_page
from app.partitions import PARTITIONS, chunk_of, new_chunked_id, partition_of
from app.problems import ProblemError
from app.redis_gateway import RedisGateway, gateway_over
from app.scripts import Scripts, load_source
from app.status_lists import StatusLists
from app.vocabulary import (
    CANCELLED,
    COMPLETED,
    OPEN,
    ORDER_FIELDS,
    ORDER_STATUSES,
    encode_items,
    new_order_id,
)
from loadtests.support.round_trips import CountingTransport
from tests.helpers import ADMIN, CLUSTER, ON_BOTH_STACKS, Shop, settled, snapshot


async def _customers_in_one_partition(shop: Shop, count: int) -> list[tuple[dict, dict]]:
    """``count`` new customers of one partition (emails choose it: app/partitions.py)."""
    by_partition: dict[int, list[tuple[dict, dict]]] = {}
    while True:
        customer, auth = await shop.customer(balance_cents=10**10)
        same = by_partition.setdefault(partition_of(customer["id"]), [])
        same.append((customer, auth))
        if len(same) == count:
            return same


async def _chunks_of(redis: Redis, partition: int) -> dict[int, dict[str, list[tuple]]]:
    """chunk -> status -> its (seq, order id) pairs, from the directories."""
    found: dict[int, dict[str, list[tuple]]] = {}
    for status in ORDER_STATUSES:
        directory = await redis.zrange(keys.order_chunks(partition, status), 0, -1, withscores=True)
        for chunk, start in directory:
            k = int(chunk)
            members = await redis.zrange(
                keys.orders_by_status(partition, status, k), 0, -1, withscores=True
            )
            assert members, f"an empty chunk {k} in the {status} directory"
            assert start <= min(score for _, score in members)
            found.setdefault(k, {})[status] = [(int(s), m.decode()) for m, s in members]
    return found


async def _assert_chunks_hold(redis: Redis, partition: int, placed: set[str]) -> None:
    """Every order in exactly one status chunk, its own; no chunk over CHUNK_ORDERS; a
    chunk's seqs all before the next one's; the counts and the state agree."""
    chunks = await _chunks_of(redis, partition)
    seen: list[str] = []
    previous_newest = 0
    for k in sorted(chunks):
        rows = [row for members in chunks[k].values() for row in members]
        assert len(rows) <= keys.CHUNK_ORDERS
        assert min(seq for seq, _ in rows) > previous_newest, k
        previous_newest = max(seq for seq, _ in rows)
        for status, members in chunks[k].items():
            counts = await redis.hget(keys.order_chunk_counts(partition, status), str(k))
            assert int(counts) == len(members)
            for seq, order_id in members:
                stored = await redis.hmget(
                    keys.order(order_id), [ORDER_FIELDS["status"], ORDER_FIELDS["seq"]]
                )
                assert stored == [status.encode(), str(seq).encode()]
                seen.append(order_id)
                stored_chunk = await redis.hget(keys.order(order_id), ORDER_FIELDS["chunk"])
                assert int(stored_chunk or chunk_of(order_id)) == k
    assert sorted(seen) == sorted(placed)
    _, current, placed_in_it = keys.order_clock_parts(await redis.get(keys.orders_seq(partition)))
    assert current * keys.CHUNK_ORDERS + placed_in_it == len(placed)


async def test_a_chunk_rolls_over_under_concurrent_placements(shop: Shop, redis: Redis) -> None:
    """Two workers (the app behind HTTP, and another with beliefs of its own that start
    stale) place 300 orders at once in one partition: each lands in exactly one chunk,
    none holds more than CHUNK_ORDERS, and the admin's list is the creation order,
    newest first, across the chunks."""
    (first, auth), (second, _) = await _customers_in_one_partition(shop, 2)
    partition = partition_of(first["id"])
    phone = await shop.phone(price_cents=100, stock=10_000)
    scripts = Scripts(gateway_over(redis))
    other_worker = ChunkHints()

    async def over_http(i: int) -> str:
        response = await shop.order(auth, [(phone["id"], 1)], autocheck=i % 2 == 0)
        assert response.status == 201, await response.text()
        return (await response.json())["order"]["id"]

    in_flight = asyncio.Semaphore(8)  # the test client's connection pool is small

    async def in_the_other_worker(i: int) -> str:
        async with in_flight:
            return await place(i)

    async def place(i: int) -> str:
        chunk = other_worker.current(partition)
        placed = await service.place_order(
            scripts,
            order_id=new_order_id(second["id"], chunk),
            customer_id=second["id"],
            lines=[(phone["id"], 1)],
            autocheck=i % 3 == 0,
            idempotency_key=None,
            idempotency_ttl=60,
            request_id=f"worker-{i}",
            hints=other_worker,
        )
        return placed.order.id

    ids = await asyncio.gather(
        *(over_http(i) for i in range(150)), *(in_the_other_worker(i) for i in range(150))
    )
    assert len(set(ids)) == 300
    assert other_worker.current(partition) == 300 // keys.CHUNK_ORDERS
    await _assert_chunks_hold(redis, partition, set(ids))
    seqs = {
        order_id: int(await redis.hget(keys.order(order_id), ORDER_FIELDS["seq"]))
        for order_id in ids
    }
    by_seq = sorted(ids, key=lambda order_id: -seqs[order_id])
    listed: list[str] = []
    for page in range(1, 5):
        response = await shop.client.get(f"/orders?page={page}&per_page=100", headers=ADMIN)
        assert response.status == 200
        body = await response.json()
        listed += [order["id"] for order in body["orders"]]
    assert listed == by_seq
    response = await shop.client.get(f"/orders?status={COMPLETED}&per_page=100", headers=ADMIN)
    stored_status = {
        order_id: (await redis.hget(keys.order(order_id), ORDER_FIELDS["status"])).decode()
        for order_id in ids
    }
    completed = [order_id for order_id in by_seq if stored_status[order_id] == COMPLETED]
    assert [order["id"] for order in (await response.json())["orders"]] == completed[:100]


async def _roll_over(shop: Shop, auth: dict, phone: dict, chunks: int) -> set[str]:
    """``chunks`` x CHUNK_ORDERS orders: the customer's partition moves on that far."""
    ids = set()
    for _ in range(chunks * keys.CHUNK_ORDERS):
        response = await shop.order(auth, [(phone["id"], 1)], autocheck=True)
        assert response.status == 201
        ids.add((await response.json())["order"]["id"])
    return ids


def _place_args(order_id: str, customer_id: str, phone_id: str) -> list:
    return [order_id, customer_id, 1, "r", "0", "0", "", 60, phone_id, 1]


async def test_a_stale_hint_is_refused_with_nothing_written(shop: Shop, redis: Redis) -> None:
    """The partition is at chunk 2. place_order and commit_order given keys of chunk 0
    write nothing (not even the commit's abort marker) and answer 2; the app's retry
    lands the order there: the collapsed place with a new id for it, the split commit
    with its id kept and the chunk in the hash. An id of chunk 1, the one just before,
    goes into chunk 2 at once (the requests in flight at a rollover), its hash saying so.
    A status change of either finds it where it is."""
    customer, auth = await shop.customer(balance_cents=10**9)
    partition = partition_of(customer["id"])
    phone = await shop.phone(price_cents=100, stock=10_000)
    rolled = await _roll_over(shop, auth, phone, 2)
    await settled(redis)
    scripts = Scripts(gateway_over(redis))

    stale = new_order_id(customer["id"], 0)
    before = await snapshot(redis)
    refused = await scripts.call(
        "place_order",
        service.place_order_keys(customer["id"], stale, OPEN, None, [phone["id"]]),
        _place_args(stale, customer["id"], phone["id"]),
    )
    assert (refused.status, refused.payload) == (409, {"code": "order_chunk_stale", "chunk": "2"})
    assert await snapshot(redis) == before

    hints = ChunkHints()  # believes chunk 0
    placed = await service.place_order(
        scripts,
        order_id=stale,
        customer_id=customer["id"],
        lines=[(phone["id"], 1)],
        autocheck=False,
        idempotency_key=None,
        idempotency_ttl=60,
        request_id="r",
        hints=hints,
    )
    assert placed.order.id != stale and chunk_of(placed.order.id) == 2
    assert hints.current(partition) == 2
    assert await redis.zscore(keys.orders_by_status(partition, OPEN, 2), placed.order.id)
    assert await redis.hget(keys.order(placed.order.id), ORDER_FIELDS["chunk"]) is None

    just_before = new_order_id(customer["id"], 1)
    late = await scripts.call(
        "place_order",
        service.place_order_keys(customer["id"], just_before, OPEN, None, [phone["id"]]),
        _place_args(just_before, customer["id"], phone["id"]),
    )
    assert late.status == 201 and late.payload["current_chunk"] == "2"
    assert await redis.zscore(keys.orders_by_status(partition, OPEN, 2), just_before)
    assert await redis.hget(keys.order(just_before), ORDER_FIELDS["chunk"]) == b"2"

    # The split saga's commit: its id (hint 0) is kept, the keys follow the chunk.
    order_id = new_order_id(customer["id"], 0)
    items = encode_items([(phone["id"], 1, 100)])
    expires = 2 * 10**13

    def commit_args(chunk: int) -> list:
        return [order_id, customer["id"], 1, "r", "0", "0", "", 60, items, expires, expires, chunk]

    before = await snapshot(redis)
    refused = await scripts.call(
        "commit_order",
        saga_service.commit_order_keys(customer["id"], order_id, OPEN, None, 0),
        commit_args(0),
    )
    assert (refused.status, refused.payload) == (409, {"code": "order_chunk_stale", "chunk": "2"})
    assert await snapshot(redis) == before
    committed = await scripts.call(
        "commit_order",
        saga_service.commit_order_keys(customer["id"], order_id, OPEN, None, 2),
        commit_args(2),
    )
    assert committed.status == 201
    assert await redis.hget(keys.order(order_id), ORDER_FIELDS["chunk"]) == b"2"
    assert await redis.zscore(keys.orders_by_status(partition, OPEN, 2), order_id)

    # A status change finds it from its id's chunk (0), is told 2, and moves it there.
    check_keys = service.check_order_keys(order_id, customer["id"], 0)
    before = await snapshot(redis)
    status, payload, changed = await redis.eval(
        load_source("check_order"),
        len(check_keys),
        *check_keys,
        customer["id"],
        "",
        0,
        "r",
        0,
    )
    assert (status, json.loads(payload), changed) == (
        409,
        {"code": "order_chunk_moved", "chunk": "2"},
        0,
    )
    assert await snapshot(redis) == before
    response = await shop.client.post(f"/orders/{order_id}/check", headers=auth)
    assert response.status == 200, await response.text()
    assert await redis.zscore(keys.orders_by_status(partition, COMPLETED, 2), order_id)
    assert await redis.zscore(keys.orders_by_status(partition, OPEN, 2), order_id) is None
    # The one of chunk 1 placed in 2: its keys for 1 name 2 as the next, one run does it.
    check_keys = service.check_order_keys(just_before, customer["id"], 1)
    status, _, changed = await redis.eval(
        load_source("check_order"), len(check_keys), *check_keys, customer["id"], "", 0, "r", 1
    )
    assert (status, changed) == (200, 1)
    assert await redis.zscore(keys.orders_by_status(partition, COMPLETED, 2), just_before)
    # And the cancel of the re-minted one (its id says 2).
    response = await shop.client.post(f"/orders/{placed.order.id}/cancel", headers=auth)
    assert response.status == 200, await response.text()
    assert await redis.zscore(keys.orders_by_status(partition, CANCELLED, 2), placed.order.id)
    await _assert_chunks_hold(redis, partition, rolled | {placed.order.id, order_id, just_before})
    # (No audit: the commit above ran without reserves, so the phone's books are off.)


async def test_a_refund_of_an_order_whose_hint_differs_moves_it_in_its_chunk(
    shop: Shop, redis: Redis
) -> None:
    """The split saga's cancel (refund_order) of an order committed after a stale hint:
    its keys follow the chunk the script answers."""
    customer, auth = await shop.customer(balance_cents=10**9)
    partition = partition_of(customer["id"])
    phone = await shop.phone(price_cents=100, stock=10_000)
    await _roll_over(shop, auth, phone, 2)
    scripts = Scripts(gateway_over(redis))
    order_id = new_order_id(customer["id"], 0)
    items = encode_items([(phone["id"], 1, 100)])
    expires = 2 * 10**13
    committed = await scripts.call(
        "commit_order",
        saga_service.commit_order_keys(customer["id"], order_id, OPEN, None, 2),
        [order_id, customer["id"], 1, "r", "0", "0", "", 60, items, expires, expires, 2],
    )
    assert committed.status == 201
    await settled(redis)
    # Its keys for the id's chunk (0) are refused, saying 2 ...
    refund_keys = saga_service.refund_order_keys(order_id, customer["id"], 0)
    with pytest.raises(ProblemError) as moved:
        await scripts.run("refund_order", refund_keys, [customer["id"], "", 0, "r", 10**15, 0, 0])
    assert moved.value.code == "order_chunk_moved" and moved.value.extra == {"chunk": 2}
    # ... and the split cancel moves it from open to cancelled in chunk 2.
    cancelled = await saga_service.cancel_order(
        gateway_over(redis),
        scripts,
        Principal(customer["id"]),
        order_id,
        "r",
        take_back_after_ms=60_000,
        always_split=True,
    )
    assert cancelled.status == CANCELLED
    assert await redis.zscore(keys.orders_by_status(partition, CANCELLED, 2), order_id)
    assert await redis.zscore(keys.orders_by_status(partition, OPEN, 2), order_id) is None


# ---- the merge over chunked lists, against a plain sorted list -------------------------

LISTS = [(p, s) for p in (3, 40, 41, 100) for s in ORDER_STATUSES]


async def _fill_chunks(redis: Redis, orders: int, seed: int) -> list[tuple[int, int, bytes]]:
    """``orders`` orders over 4 partitions as the scripts place them (in seq order per
    partition, CHUNK_ORDERS to a chunk), most completed and some moved out later; scores
    within one hour. Returns (seq, list position, id) of each."""
    rng = random.Random(seed)
    base = 1_764_600_000_000_000
    partitions = sorted({p for p, _ in LISTS})
    seqs = sorted(rng.sample(range(3_600 * 10**6), orders))
    placed = [0] * PARTITIONS
    starts: dict[tuple[int, int], int] = {}
    stored = []
    # What the scripts write order by order, summed up first and written in a few
    # commands a key: the same data in a fraction of the time.
    zsets: dict[str, dict[str, int]] = {}
    counts: Counter[tuple[str, str]] = Counter()
    clocks: dict[int, str] = {}
    for offset in seqs:
        seq = base + offset
        p = rng.choice(partitions)
        k = placed[p] // keys.CHUNK_ORDERS
        placed[p] += 1
        start = starts.setdefault((p, k), seq)
        status = rng.choices(ORDER_STATUSES, weights=(1, 8, 1))[0]
        order_id = new_chunked_id(p, k)
        zsets.setdefault(keys.orders_by_status(p, status, k), {})[order_id] = seq
        zsets.setdefault(keys.order_chunks(p, status), {})[str(k)] = start
        counts[keys.order_chunk_counts(p, status), str(k)] += 1
        counts[keys.order_chunk_counts(p, status), f"g{k // keys.CHUNK_GROUP}"] += 1
        counts[keys.ledger(p), f"orders_{status}"] += 1
        clocks[p] = keys.order_clock(seq, k, placed[p] - k * keys.CHUNK_ORDERS)
        stored.append((seq, LISTS.index((p, status)), order_id.encode()))
    async with redis.pipeline(transaction=False) as pipe:
        for key, members in zsets.items():
            pipe.zadd(key, members)
        for (key, field), n in counts.items():
            pipe.hincrby(key, field, n)
        for p, clock in clocks.items():
            pipe.set(keys.orders_seq(p), clock)
        await pipe.execute()
    return stored


def _newest_first(stored: list[tuple[int, int, bytes]]) -> list[bytes]:
    return [member for _, _, member in sorted(stored, key=lambda row: (-row[0], row[1]))]


@pytest.fixture
async def tier_gateway(
    request: pytest.FixtureRequest, stack_kind: str, redis: Redis
) -> AsyncIterator[RedisGateway]:
    """The app's own gateway of the tier: on the cluster the ClusterGateway."""
    if stack_kind == CLUSTER:
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        nodes = tuple(("127.0.0.1", port) for port in cluster.ports[:3])
        opened = open_cluster_gateway("redis://127.0.0.1/0", nodes, 1, 1000, 5.0, 8)
    else:
        opened = gateway_over(redis)
    yield opened
    await opened.aclose()


@ON_BOTH_STACKS
async def test_every_page_of_chunked_lists_is_a_slice_of_the_sorted_list(
    redis: Redis, tier_gateway: RedisGateway
) -> None:
    """On the cluster too: its pipelines route each command by its key, and count_newer.lua
    is loaded on every primary at its first NOSCRIPT."""
    stored = await _fill_chunks(redis, 4_000, seed=5)
    expected = _newest_first(stored)
    gateway = tier_gateway
    offsets = [0, 1, 9, 100, HEAD_LIMIT - 10, HEAD_LIMIT, 1234, 2999, 3990, 3999, 4000]
    for offset in offsets:
        for count in (1, 10, 100):
            total, members = await merged_lists_page(
                gateway, StatusLists(LISTS), offset, count, newest_first=True
            )
            assert total == 4_000
            assert members == expected[offset : offset + count], (offset, count)


@pytest.mark.parametrize("offset", [0, 2_000], ids=["head", "deep"])
async def test_a_page_of_chunked_lists_costs_the_same_with_10_times_the_rows(
    redis: Redis, offset: int
) -> None:
    """The same round trips for 4,000 and 40,000 orders (31 and 312 chunks of a
    partition's orders): the bisection probes the hour of seqs, each probe a directory
    read and a count per partition; the head reads a few chunks of each list."""
    costs = []
    for orders in (4_000, 40_000):
        await redis.flushall()
        stored = await _fill_chunks(redis, orders, seed=orders)
        transport = CountingTransport(redis)
        total, members = await merged_lists_page(
            RedisGateway(transport), StatusLists(LISTS), offset, 10, newest_first=True
        )
        assert total == orders and members == _newest_first(stored)[offset : offset + 10]
        costs.append(transport.round_trips)
    small, large = costs
    assert abs(large - small) <= 2  # within one probe (two round trips)
    if offset == 0:
        assert small <= 4
