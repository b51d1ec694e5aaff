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
from app.orders.settler import Settler
from app.redis_gateway import WriteUnconfirmed
from app.vocabulary import encode_items
from tests.saga_fixtures import (
    ORDER_PARTITION,
    OTHER_PHONE_PARTITION,
    PHONE_PARTITION,
    SagaWorld,
)

LATER_MS = 10**13


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
    # The app reserved on both phone partitions and died: no commit, no settle.
    for partition, phone_id in ((PHONE_PARTITION, phone), (OTHER_PHONE_PARTITION, other)):
        reserved = await steps.reserve(
            saga.scripts, order, partition, [(phone_id, 2)], now_ms() + 200
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
    await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 1)], now_ms())
    # The app committed (the order exists) and died before settling.
    await saga.redis.hset(keys.order(order), mapping={"id": order})

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
    await saga.redis.hset(keys.order(order), mapping={"id": order, "items": items})
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
    await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 1)], now_ms())
    assert await first.sweep() == 1
    assert await saga.redis.get(keys.settler_lease(PHONE_PARTITION)) == first.holder
    late = partitions.new_id(ORDER_PARTITION)
    await steps.reserve(saga.scripts, late, PHONE_PARTITION, [(phone, 1)], now_ms())
    # The other worker finds the work due but the partition leased: it leaves it.
    assert await second.sweep() == 0
    assert (await saga.units(phone))["held"] == 1
    assert await first.sweep() == 1
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
    await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 2)], now_ms())
    view = redis_cluster.topology()
    fence_primary = view.primary_for_slot(key_slot(keys.aborts(ORDER_PARTITION).encode()))
    (replica,) = view.replicas_of(fence_primary)
    settler = Settler(saga.gateway, saga.scripts)

    redis_cluster.procs[replica.port].send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(WriteUnconfirmed):
            await settler.sweep()
        # The marker is on the primary; the units stay held until the replica has it.
        assert await saga.redis.hget(keys.aborts(ORDER_PARTITION), order) == "swept"
        assert await saga.units(phone) == {"stock": 1, "held": 2, "sold": 0, "added": 3}
    finally:
        redis_cluster.procs[replica.port].send_signal(signal.SIGCONT)

    async def released() -> bool:
        with contextlib.suppress(WriteUnconfirmed):
            await settler.sweep()
        return (await saga.units(phone))["held"] == 0

    await wait_until_async(released, "the sweep after the replica is back", 60)
    assert await saga.units(phone) == {"stock": 3, "held": 0, "sold": 0, "added": 3}
    await asyncio.to_thread(redis_cluster.wait_healthy)
