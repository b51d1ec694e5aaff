"""The settler (app/orders/settler.py) on one redis-server and on the real cluster: it
finishes reservations a dead app left (fence first, then settle), takes back the stock
of cancelled orders whose app died before giving it back, and sweeps a partition only
while it holds that partition's lease. Every wait polls the data; nothing sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator

import pytest
from redis.crc import key_slot

from app import keys, partitions
from app.ops.poll import wait_until_async
from app.ops.redis_cluster import LocalCluster
from app.orders import saga as steps
from app.orders.saga_service import commit_order_keys
from app.orders.settler import Settler
from app.redis_gateway import WriteUnconfirmed
from app.vocabulary import CANCELLED, OPEN, ORDER_FIELDS, encode_items
from tests.saga_fixtures import (
    ORDER_PARTITION,
    OTHER_PHONE_PARTITION,
    PHONE_PARTITION,
    SagaWorld,
)

LATER_MS = 10**13
# The expiry of a reservation the settler is to find left behind: each such test waits it
# out. One call must reach Redis within it (as tests/crash_fixtures.py's TTL_MS, a whole
# request), so a second is ample; the test that runs several steps inside it keeps 2 s.
SOON_MS = 1_000


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
async def running_settler(saga: SagaWorld) -> AsyncIterator[Settler]:
    """A settler ticking fast in the background, as a web worker runs it."""
    settler = Settler(saga.gateway, saga.scripts, interval_s=0.05)
    task = asyncio.create_task(settler.run())
    yield settler
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_settler_gives_back_the_stock_a_dead_app_left_held(
    saga: SagaWorld, running_settler: Settler
) -> None:
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=3)
    other = await saga.phone(OTHER_PHONE_PARTITION, price_cents=100, stock=3)
    order = partitions.new_id(ORDER_PARTITION)
    # The app reserved on both phone partitions and died: no commit, no settle. (Its
    # expiry is a second away, SOON_MS: a reserve that reached Redis past it would be refused.)
    for partition, phone_id in ((PHONE_PARTITION, phone), (OTHER_PHONE_PARTITION, other)):
        reserved = await steps.reserve(
            saga.scripts, order, partition, [(phone_id, 2)], now_ms() + SOON_MS
        )
        assert reserved.status == 200
    assert (await saga.units(phone))["held"] == 2

    async def given_back() -> bool:
        units = [await saga.units(phone_id) for phone_id in (phone, other)]
        return all(u["held"] == 0 for u in units)

    await wait_until_async(given_back, "the settler to release both reservations", 30)
    for phone_id in (phone, other):
        assert await saga.units(phone_id) == {"stock": 3, "held": 0, "sold": 0, "added": 3}
    # The fence made the order impossible before anything was given back ...
    assert await saga.redis.hget(keys.aborts(ORDER_PARTITION), order) == "swept"
    # ... and the late try of the dead app (a retried reserve) holds nothing.
    late = await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 2)], LATER_MS)
    assert late.payload == {"code": "order_released"}
    assert (await saga.units(phone))["stock"] == 3


async def test_settler_settles_a_committed_orders_reservation_as_sold(
    saga: SagaWorld, running_settler: Settler
) -> None:
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=3)
    order = partitions.new_id(ORDER_PARTITION)
    await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 1)], now_ms() + SOON_MS)
    # The app committed (the order exists) and died before settling.
    await saga.redis.hset(keys.order(order), mapping={ORDER_FIELDS["status"]: OPEN})

    async def sold() -> bool:
        return (await saga.units(phone))["sold"] == 1

    await wait_until_async(sold, "the settler to settle the committed order", 30)
    assert await saga.units(phone) == {"stock": 2, "held": 0, "sold": 1, "added": 3}
    assert not await saga.redis.hexists(keys.aborts(ORDER_PARTITION), order)


async def test_settler_takes_back_a_cancelled_orders_stock_on_every_phone_partition(
    saga: SagaWorld, running_settler: Settler
) -> None:
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=3)
    other = await saga.phone(OTHER_PHONE_PARTITION, price_cents=200, stock=3)
    order = partitions.new_id(ORDER_PARTITION)
    # Committed and settled on one partition; on the other the settle never ran.
    lines = (
        await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 2)], LATER_MS)
    ).payload["lines"]
    await steps.settle(saga.scripts, PHONE_PARTITION, order, steps.COMMITTED, lines)
    await steps.reserve(saga.scripts, order, OTHER_PHONE_PARTITION, [(other, 1)], LATER_MS)
    items = encode_items([(phone, 2, 100), (other, 1, 200)])
    await saga.redis.hset(
        keys.order(order), mapping={ORDER_FIELDS["status"]: CANCELLED, ORDER_FIELDS["items"]: items}
    )
    # Then cancelled (the refund is cancel_order's); the app died before giving stock back.
    await saga.redis.zadd(keys.take_backs_due(ORDER_PARTITION), {order: now_ms()})

    async def taken_back() -> bool:
        return await saga.redis.zcard(keys.take_backs_due(ORDER_PARTITION)) == 0

    await wait_until_async(taken_back, "the settler to take the stock back", 30)
    for phone_id in (phone, other):
        assert await saga.units(phone_id) == {"stock": 3, "held": 0, "sold": 0, "added": 3}
    for partition in (PHONE_PARTITION, OTHER_PHONE_PARTITION):
        assert await saga.redis.sismember(keys.taken_back(partition), order)


async def test_a_partition_is_swept_only_by_its_lease_holder(saga: SagaWorld) -> None:
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=5)
    first, second = Settler(saga.gateway, saga.scripts), Settler(saga.gateway, saga.scripts)
    order = partitions.new_id(ORDER_PARTITION)
    # Swept as if its expiry had come (a reserve past its expiry is refused).
    due = now_ms() + 60_000
    await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 1)], due)
    assert await first.sweep(due) == 1
    assert await saga.redis.get(keys.settler_lease(PHONE_PARTITION)) == first.holder
    late = partitions.new_id(ORDER_PARTITION)
    await steps.reserve(saga.scripts, late, PHONE_PARTITION, [(phone, 1)], due)
    # The other worker finds the work due but the partition leased: it leaves it.
    assert await second.sweep(due) == 0
    assert (await saga.units(phone))["held"] == 1
    assert await first.sweep(due) == 1
    assert await saga.units(phone) == {"stock": 5, "held": 0, "sold": 0, "added": 5}


async def test_a_sweep_leaves_reservations_that_are_not_due(saga: SagaWorld) -> None:
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=5)
    order = partitions.new_id(ORDER_PARTITION)
    await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 1)], LATER_MS)
    assert await Settler(saga.gateway, saga.scripts).sweep() == 0
    assert (await saga.units(phone))["held"] == 1
    assert not await saga.redis.hexists(keys.aborts(ORDER_PARTITION), order)


@pytest.mark.parametrize("saga", ["cluster"], indirect=True)
async def test_nothing_is_released_until_the_fence_is_acknowledged_by_the_replica(
    saga: SagaWorld, redis_cluster: LocalCluster
) -> None:
    """docs/data-tier.md section 4: a fence lost with its primary would let a late commit
    through after the stock was given back, so the release waits for the replica to
    have the fence (the gateway's WAIT). Replica frozen: the sweep settles nothing."""
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=3)
    order = partitions.new_id(ORDER_PARTITION)
    due = now_ms() + 60_000  # swept as if its expiry had come
    await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 2)], due)
    view = redis_cluster.topology()
    fence_primary = view.primary_for_slot(key_slot(keys.aborts(ORDER_PARTITION).encode()))
    (replica,) = view.replicas_of(fence_primary)
    settler = Settler(saga.gateway, saga.scripts)

    redis_cluster.procs[replica.port].send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(WriteUnconfirmed):
            await settler.sweep(due)
        # The marker is on the primary; the units stay held until the replica has it.
        assert await saga.redis.hget(keys.aborts(ORDER_PARTITION), order) == "swept"
        assert await saga.units(phone) == {"stock": 1, "held": 2, "sold": 0, "added": 3}
    finally:
        redis_cluster.procs[replica.port].send_signal(signal.SIGCONT)

    async def released() -> bool:
        with contextlib.suppress(WriteUnconfirmed):
            await settler.sweep(due)
        return (await saga.units(phone))["held"] == 0

    await wait_until_async(released, "the sweep after the replica is back", 60)
    assert await saga.units(phone) == {"stock": 3, "held": 0, "sold": 0, "added": 3}
    await asyncio.to_thread(redis_cluster.wait_healthy)


async def _redis_now_ms(saga: SagaWorld) -> int:
    seconds, micros = await saga.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_a_marker_and_a_tombstone_outlive_every_late_step_of_their_order(
    saga: SagaWorld,
) -> None:
    """docs/data-tier.md 3.2: an aborted order's marker (ab{P}) and tombstone (rx{Q})
    refuse its late commit and reserve; they are pruned only once the order's expiry
    refuses those by itself (reserve_stock and commit_order read Redis TIME), and then
    nothing of the order can run."""
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=3)
    customer = partitions.new_id(ORDER_PARTITION)
    await saga.redis.hset(keys.customer(customer), mapping={"id": customer, "balance_cents": 500})
    order = partitions.new_id(ORDER_PARTITION)
    expires = now_ms() + 2_000  # soon, yet far enough for the reserve to reach Redis within it
    reserved = await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 1)], expires)
    # The app died; the settler fences the order and releases its unit.
    assert await steps.fence(saga.scripts, ORDER_PARTITION, [order]) == [steps.ABORTED]
    await steps.settle(
        saga.scripts, PHONE_PARTITION, order, steps.ABORTED, reserved.payload["lines"]
    )
    marker_due = await saga.redis.zscore(keys.aborts_due(ORDER_PARTITION), order)
    tombstone_due = await saga.redis.zscore(keys.releases_due(PHONE_PARTITION), order)
    assert marker_due and tombstone_due
    for keep_until in (marker_due, tombstone_due):
        assert keep_until >= expires + steps.TOMBSTONE_MARGIN_MS

    commit_keys = commit_order_keys(customer, order, "open", None, 0)
    items = encode_items([(phone, 1, 100)])

    async def late_steps() -> tuple[dict, dict]:
        commit = await saga.scripts.call(
            "commit_order",
            commit_keys,
            [order, customer, 1, "r", "0", "0", "f", 60, items, expires, steps.keep_until(), 0],
        )
        reserve = await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 1)], expires)
        return commit.payload, reserve.payload

    # Within the expiry the marker and the tombstone are what refuses them.
    assert await late_steps() == ({"code": "service_unavailable"}, {"code": "order_released"})
    # (The cluster's partitions may hold other tests' markers: only this order's count.)
    settler = Settler(saga.gateway, saga.scripts)
    await settler.prune(int(min(marker_due, tombstone_due)) - 1)
    assert await saga.redis.hexists(keys.aborts(ORDER_PARTITION), order)
    assert await saga.redis.hexists(keys.releases(PHONE_PARTITION), order)

    async def expired() -> bool:
        return await _redis_now_ms(saga) > expires

    await wait_until_async(expired, "Redis's clock to pass the order's expiry", 30)
    prune_time = int(max(marker_due, tombstone_due))
    pruned = await settler.prune(prune_time)
    assert pruned["aborts"] >= 1 and pruned["releases"] >= 1
    assert not await saga.redis.hexists(keys.aborts(ORDER_PARTITION), order)
    assert not await saga.redis.hexists(keys.releases(PHONE_PARTITION), order)
    assert await saga.redis.zscore(keys.aborts_due(ORDER_PARTITION), order) is None
    assert await saga.redis.zscore(keys.releases_due(PHONE_PARTITION), order) is None
    assert await settler.prune(prune_time) == {"aborts": 0, "releases": 0}  # idempotent
    # Gone, and the order's expiry alone refuses its late steps: nothing held or debited.
    assert await late_steps() == ({"code": "service_unavailable"}, {"code": "order_expired"})
    assert not await saga.redis.exists(keys.order(order))
    assert await saga.redis.hget(keys.customer(customer), "balance_cents") == "500"
    assert await saga.units(phone) == {"stock": 3, "held": 0, "sold": 0, "added": 3}


async def test_the_running_settler_prunes_what_is_past_its_keep_until(saga: SagaWorld) -> None:
    order = partitions.new_id(ORDER_PARTITION)
    # A marker whose keep-until has come (written with one in the past).
    await saga.scripts.call(
        "fence_orders",
        [keys.aborts(ORDER_PARTITION), keys.aborts_due(ORDER_PARTITION), keys.order(order)],
        [now_ms() - 1, steps.ORDER, order],
    )
    assert await saga.redis.hget(keys.aborts(ORDER_PARTITION), order) == "swept"
    settler = Settler(saga.gateway, saga.scripts, interval_s=0.05, prune_every=2)
    task = asyncio.create_task(settler.run())
    try:

        async def pruned() -> bool:
            gone = not await saga.redis.hexists(keys.aborts(ORDER_PARTITION), order)
            due = await saga.redis.zscore(keys.aborts_due(ORDER_PARTITION), order)
            return gone and due is None

        await wait_until_async(pruned, "the settler to prune the marker", 30)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
