"""What a cancel costs in round trips, by form (app/orders/saga_service.py: cancel_order;
docs/data-tier.md, 3.9 and 9). The order's owner and items are read, the keys named from
them and passed in KEYS, then cancel_order.lua, which checks the reservations itself: two,
the customer's and the admin's alike (before: three, a read of the reservations between).
A reservation still held stops the script before any write, and the split cancel gives it
back. On the cluster redis-py's slot map chooses the form with no look at the reservations.

One redis-server's round trips are counted at the transport, as tests/test_paging.py's cost
test does; the cluster's from the gateway's own per-call counts (its scripts go past the
transport)."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from app import keys, partitions
from app.auth import ADMIN, Principal
from app.customers import service as customers
from app.customers.models import CustomerCreate
from app.orders import saga_service, service
from app.partitions import partition_of
from app.phones import service as phones
from app.phones.models import PhoneCreate
from app.problems import ProblemError
from app.redis_gateway import RedisGateway, gateway_over
from app.scripts import Scripts
from app.vocabulary import CANCELLED, ORDER_FIELDS
from loadtests.support.round_trips import CountingTransport
from tests.helpers import gateway_calls
from tests.saga_fixtures import ORDER_PARTITION, SagaWorld


def _no_settle(partition: int, order_id: str, outcome: str, lines: str) -> None:
    """Leaves a split order's reservations held, as an app that died before settling."""


async def _place(scripts: Scripts, customer_id: str, lines: list[tuple[str, int]], **how) -> str:
    placed = await saga_service.place_order(
        scripts,
        _no_settle,
        customer_id=customer_id,
        lines=lines,
        autocheck=False,
        idempotency_key=None,
        idempotency_ttl=60,
        request_id="req",
        reservation_ttl_ms=10_000,
        **how,
    )
    return placed.order.id


async def _cancel(gateway: RedisGateway, principal: Principal, order_id: str) -> str:
    order = await saga_service.cancel_order(
        gateway, Scripts(gateway), principal, order_id, "req", take_back_after_ms=10_000
    )
    return order.status


async def _units(redis: Redis, phone_id: str) -> list[int]:
    return [int(v or 0) for v in await redis.hmget(keys.phone(phone_id), "stock", "held", "sold")]


async def _shop(redis: Redis) -> tuple[Scripts, list[str], str]:
    """Two phones of 5 units each and a customer with 10,000 cents."""
    scripts = Scripts(gateway_over(redis))
    phone_ids = [
        (await phones.create_phone(scripts, PhoneCreate(name=f"p{i}", price_cents=100, stock=5))).id
        for i in range(2)
    ]
    customer, _ = await customers.create_customer(
        scripts,
        CustomerCreate(name="Ann", surname="Lee", email="ann@example.com", balance_cents=10_000),
    )
    return scripts, phone_ids, customer.id


async def test_a_customers_cancel_on_one_redis_server_is_two_round_trips(redis: Redis) -> None:
    scripts, (phone, other), customer = await _shop(redis)
    order_id = await _place(scripts, customer, [(phone, 2), (other, 1)])
    transport = CountingTransport(redis)
    gateway = RedisGateway(transport)
    await Scripts(gateway).load()
    transport.round_trips = 0

    assert await _cancel(gateway, Principal(customer), order_id) == CANCELLED
    # The order's owner and items, then the script (before: its reservations between,
    # HEXISTS per phone partition).
    assert transport.round_trips == 2
    assert await _units(redis, phone) == [5, 0, 0] and await _units(redis, other) == [5, 0, 0]
    assert await redis.hget(keys.customer(customer), "balance_cents") == b"10000"
    # Cancelled again: answered as it is, by the same two.
    assert await _cancel(gateway, Principal(customer), order_id) == CANCELLED
    assert transport.round_trips == 4


async def test_an_admins_cancel_is_two_round_trips_and_a_strangers_is_not_found(
    redis: Redis,
) -> None:
    scripts, (phone, _), customer = await _shop(redis)
    order_id = await _place(scripts, customer, [(phone, 1)])
    transport = CountingTransport(redis)
    gateway = RedisGateway(transport)
    await Scripts(gateway).load()
    # Another customer of the order's partition: the read says not found, no script.
    stranger = partitions.new_id(partition_of(customer))
    transport.round_trips = 0
    with pytest.raises(ProblemError) as refused:
        await _cancel(gateway, Principal(stranger), order_id)
    assert refused.value.code == "order_not_found" and transport.round_trips == 1
    # One of another partition: known without asking (an order lives in its customer's).
    far = partitions.new_id((partition_of(customer) + 1) % partitions.PARTITIONS)
    with pytest.raises(ProblemError) as refused:
        await _cancel(gateway, Principal(far), order_id)
    assert refused.value.code == "order_not_found" and transport.round_trips == 1
    assert await _units(redis, phone) == [4, 0, 1]

    # The admin's: the owner and items, read first, then the script.
    assert await _cancel(gateway, ADMIN, order_id) == CANCELLED
    assert transport.round_trips == 3
    assert await _units(redis, phone) == [5, 0, 0]


async def test_a_reservation_still_held_stops_the_script_and_the_split_cancel_gives_it_back(
    redis: Redis,
) -> None:
    """An order placed split whose settle never ran (test-only always_split, an app that
    died): cancel_order.lua would restock units that are still held, so it writes
    nothing and says so, and the split cancel settles them and gives them back."""
    scripts, (phone, other), customer = await _shop(redis)
    order_id = await _place(scripts, customer, [(phone, 2), (other, 1)], always_split=True)
    assert await _units(redis, phone) == [3, 2, 0]
    before = {key: await redis.dump(key) for key in await redis.keys("*")}
    items = (await redis.hget(keys.order(order_id), ORDER_FIELDS["items"])).decode()
    held = await service.cancel_on_one_node(
        scripts, Principal(customer), order_id, customer, items, "r"
    )
    assert held is None
    assert {key: await redis.dump(key) for key in await redis.keys("*")} == before

    gateway = gateway_over(redis)
    assert await _cancel(gateway, Principal(customer), order_id) == CANCELLED
    assert await _units(redis, phone) == [5, 0, 0] and await _units(redis, other) == [5, 0, 0]
    assert await redis.hget(keys.customer(customer), "balance_cents") == b"10000"
    for phone_id in (phone, other):
        reservations = keys.reservations(partition_of(phone_id))
        assert not await redis.hexists(reservations, order_id)
    assert await redis.zcard(keys.take_backs_due(partition_of(order_id))) == 0


@pytest.mark.cluster
@pytest.mark.parametrize("saga", ["cluster"], indirect=True)
async def test_on_the_cluster_the_slot_map_chooses_the_form_without_reading_reservations(
    saga: SagaWorld,
) -> None:
    """Read the order (its owner and phones), then either cancel_order.lua on the one
    primary that serves them all, or the split cancel where they are spread: the slot
    map says which, and neither needs the reservations read first (the script checks
    them itself; the split give-back settles one still held)."""
    customer = partitions.new_id(ORDER_PARTITION)
    await saga.redis.hset(
        keys.customer(customer), mapping={"id": customer, "balance_cents": 10_000}
    )
    home = saga.node_of(keys.customer(customer))
    near_partition = next(
        p
        for p in range(partitions.PARTITIONS)
        if p != ORDER_PARTITION and saga.node_of(keys.ledger(p)) == home
    )
    far_partition = next(
        p for p in range(partitions.PARTITIONS) if saga.node_of(keys.ledger(p)) != home
    )
    near = await saga.phone(near_partition, price_cents=100, stock=5)
    far = await saga.phone(far_partition, price_cents=100, stock=5)
    collapsed = await _place(saga.scripts, customer, [(near, 2)])
    spread = await _place(saga.scripts, customer, [(near, 1), (far, 1)])

    calls = gateway_calls()
    assert await _cancel(saga.gateway, Principal(customer), collapsed) == CANCELLED
    # The order's items, then the script (before: and the reservations between).
    assert gateway_calls() - calls == 2

    calls = gateway_calls()
    assert await _cancel(saga.gateway, Principal(customer), spread) == CANCELLED
    # The order's items, the phones' stock (the ceiling), the refund, a give-back per
    # phone partition (2), the take-back's ZREM (before: and the reservations).
    assert gateway_calls() - calls == 6
    assert await saga.units(near) == {"stock": 5, "held": 0, "sold": 0, "added": 5}
    assert await saga.units(far) == {"stock": 5, "held": 0, "sold": 0, "added": 5}
    assert await saga.redis.hget(keys.customer(customer), "balance_cents") == "10000"
