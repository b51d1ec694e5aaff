"""Escrow's grants at the scripts (docs/escrow.md, section 4), on one redis-server and on the
real 3+3 cluster, the stripe's host partition on another primary than the phone's:
reserve_grant holds a striped pool's units under a grant id minted in the host (refused,
writing nothing, for a phone that is not striped or whose pool above the floor is too
small), idempotent by grant id; settle_reservation moves a grant's units held -> lent
(committed) or held -> stock (aborted) and takes it out of the grants in flight; the
fence's grant kind aborts a grant whose receipt never came, and the settler's sweep then
gives its units back, only after the fence, and only once the host's replica has the
fence's marker (WAIT)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import pytest
from redis.crc import key_slot

from app import keys, partitions
from app.ops.poll import wait_until_async
from app.ops.redis_cluster import LocalCluster
from app.orders import saga as steps
from app.orders import stripes
from app.orders.settler import Settler
from app.redis_gateway import WriteUnconfirmed
from app.vocabulary import DRAINING, STRIPED, decode_grant, encode_grant, encode_items
from tests.saga_fixtures import ORDER_PARTITION, PHONE_PARTITION, SagaWorld

LATER_MS = 10**13  # an expiry no sweep reaches during a test
# The stripe's host partition: another primary's than PHONE_PARTITION's on the cluster.
HOST = ORDER_PARTITION
FLOOR, SHARES, MINIMUM = 64, 2, 8


async def striped_phone(saga: SagaWorld, stock: int, mode: str = STRIPED) -> str:
    phone = await saga.phone(PHONE_PARTITION, price_cents=700, stock=stock)
    await saga.redis.hset(keys.phone(phone), mapping={"mode": mode, "gen": 3})
    return phone


async def grant(saga: SagaWorld, phone: str, units: int, grant_id: str | None = None) -> tuple:
    grant_id = grant_id or partitions.new_id(HOST)
    result = await steps.reserve_grant(
        saga.scripts,
        grant_id,
        phone,
        units,
        LATER_MS,
        floor=FLOOR,
        shares=SHARES,
        minimum=MINIMUM,
    )
    return grant_id, result


async def units(saga: SagaWorld, phone: str) -> dict[str, int]:
    row = await saga.redis.hmget(keys.phone(phone), "stock", "held", "sold", "lent")
    return dict(zip(("stock", "held", "sold", "lent"), (int(v or 0) for v in row), strict=True))


async def test_a_grant_holds_a_striped_pools_units_once_under_its_host(saga: SagaWorld) -> None:
    if saga.backend == "cluster":
        assert saga.node_of(keys.grant_receipts(HOST)) != saga.node_of(keys.phone("x" * 22))
    phone = await striped_phone(saga, 200)
    grant_id, first = await grant(saga, phone, 16)
    _, second = await grant(saga, phone, 16, grant_id)
    stored = encode_grant(HOST, 3, encode_items([(phone, 16, 700)]))
    assert (first.status, first.flag) == (200, False)
    assert (second.status, second.flag) == (200, True)
    assert first.payload == second.payload == {"reservation": stored, "units": "16"}
    assert decode_grant(stored) == (HOST, 3, encode_items([(phone, 16, 700)]))
    assert await units(saga, phone) == {"stock": 184, "held": 16, "sold": 0, "lent": 0}
    assert await saga.redis.hget(keys.reservations(PHONE_PARTITION), grant_id) == stored
    assert await saga.redis.zscore(keys.reservations_due(PHONE_PARTITION), grant_id) == LATER_MS
    assert await saga.redis.smembers(keys.stripe_hosts(phone)) == {str(HOST)}
    assert await saga.redis.smembers(keys.grants_in_flight(phone)) == {f"{HOST}:{grant_id}"}
    ledger = await saga.ledger(PHONE_PARTITION)
    assert (ledger["stock_units"], ledger["held_units"], ledger["changes"]) == (-16, 16, 1)


async def test_a_grant_is_capped_by_the_pool_above_the_floor_and_refused_below_the_minimum(
    saga: SagaWorld,
) -> None:
    phone = await striped_phone(saga, 100)
    # (100 - 64) / 2 = 18 of the 256 wanted.
    _, capped = await grant(saga, phone, 256)
    assert (capped.status, capped.payload["units"]) == (200, "18")
    # (82 - 64) / 2 = 9, then (73 - 64) / 2 = 4 < 8: refused, nothing written.
    assert (await grant(saga, phone, 256))[1].payload["units"] == "9"
    grant_id, short = await grant(saga, phone, 256)
    assert (short.status, short.payload) == (
        409,
        {"code": "grant_short", "available": "73", "units": "4"},
    )
    assert await units(saga, phone) == {"stock": 73, "held": 27, "sold": 0, "lent": 0}
    assert not await saga.redis.hexists(keys.reservations(PHONE_PARTITION), grant_id)


@pytest.mark.parametrize("mode", ["", DRAINING])
async def test_a_pool_that_is_not_striped_grants_nothing(saga: SagaWorld, mode: str) -> None:
    phone = await saga.phone(PHONE_PARTITION, price_cents=700, stock=1000)
    if mode:
        await saga.redis.hset(keys.phone(phone), "mode", mode)
    _, refused = await grant(saga, phone, 16)
    assert (refused.status, refused.payload) == (409, {"code": "not_striped", "mode": mode})
    missing = partitions.new_id(PHONE_PARTITION)
    _, not_found = await grant(saga, missing, 16)
    assert (not_found.status, not_found.payload["code"]) == (404, "phone_not_found")
    assert await units(saga, phone) == {"stock": 1000, "held": 0, "sold": 0, "lent": 0}
    assert await saga.redis.hlen(keys.reservations(PHONE_PARTITION)) == 0
    assert not await saga.redis.exists(keys.stripe_hosts(phone), keys.grants_in_flight(phone))
    assert await saga.ledger(PHONE_PARTITION) == {}


async def test_a_committed_grant_settles_held_to_lent_and_an_aborted_one_to_stock(
    saga: SagaWorld,
) -> None:
    phone = await striped_phone(saga, 200)
    lent_id, lent = await grant(saga, phone, 16)
    back_id, back = await grant(saga, phone, 8)
    order = partitions.new_id(ORDER_PARTITION)
    order_lines = (
        await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 2)], LATER_MS)
    ).payload["lines"]
    # One call settles the grants and an order together, as the settler batches them.
    results = await steps.settle_many(
        saga.scripts,
        PHONE_PARTITION,
        [
            (lent_id, steps.COMMITTED, lent.payload["reservation"]),
            (back_id, steps.ABORTED, back.payload["reservation"]),
            (order, steps.COMMITTED, order_lines),
        ],
    )
    assert [result["settled"] for result in results] == ["1", "1", "1"]
    assert await units(saga, phone) == {"stock": 182, "held": 0, "sold": 2, "lent": 16}
    assert await saga.redis.smembers(keys.grants_in_flight(phone)) == set()
    assert await saga.redis.hexists(keys.releases(PHONE_PARTITION), back_id)
    ledger = await saga.ledger(PHONE_PARTITION)
    assert ledger == {"stock_units": -18, "sold_units": 2, "lent_units": 16, "changes": 4}
    # Settled again (a retried call): nothing moves twice.
    again = await steps.settle(saga.scripts, PHONE_PARTITION, lent_id, steps.COMMITTED, "")
    assert again == {"outcome": "committed", "settled": "0"}
    assert await units(saga, phone) == {"stock": 182, "held": 0, "sold": 2, "lent": 16}
    # The released grant cannot be reserved again (its tombstone).
    _, late = await grant(saga, phone, 8, back_id)
    assert late.payload == {"code": "order_released"}


async def test_the_fence_aborts_a_grant_whose_receipt_never_came_before_its_units_go_back(
    saga: SagaWorld,
) -> None:
    phone = await striped_phone(saga, 200)
    grant_id, _ = await grant(saga, phone, 16)
    # Its app died before the receipt: due now, the settler's sweep finds it.
    await saga.redis.zadd(keys.reservations_due(PHONE_PARTITION), {grant_id: 1})
    settler = Settler(saga.gateway, saga.scripts)
    assert await settler.sweep() >= 1
    # The fence wrote the abort marker on the host (the receipt would now be refused)...
    assert await saga.redis.hget(keys.aborts(HOST), grant_id) == "swept"
    assert not await saga.redis.hexists(keys.grant_receipts(HOST), grant_id)
    # ... and the units are back in the pool, the grant no longer in flight.
    assert await units(saga, phone) == {"stock": 200, "held": 0, "sold": 0, "lent": 0}
    assert await saga.redis.smembers(keys.grants_in_flight(phone)) == set()
    assert await saga.redis.hexists(keys.releases(PHONE_PARTITION), grant_id)
    # The fence answers the same again, for a grant as for an order.
    assert await steps.fence_grants(saga.scripts, HOST, [grant_id]) == [steps.ABORTED]


async def test_the_fence_tells_grants_from_orders_in_one_call(saga: SagaWorld) -> None:
    order, grant_id = partitions.new_id(HOST), partitions.new_id(HOST)
    # An order hash named like the grant's proof would not make the grant committed.
    await saga.redis.hset(keys.order(grant_id), "s", "open")
    try:
        outcomes = await steps.fence(
            saga.scripts, HOST, [order, grant_id], [steps.ORDER, steps.GRANT]
        )
    finally:
        await saga.redis.delete(keys.order(grant_id))
    assert outcomes == [steps.ABORTED, steps.ABORTED]
    with pytest.raises(ValueError, match="kinds"):
        await steps.fence(saga.scripts, HOST, [order], ["x"])


async def test_a_received_grant_is_committed_by_the_fence_and_no_step_acts_twice(
    saga: SagaWorld,
) -> None:
    """A grant's three steps, each run twice (a retried call): the reserve holds once, the
    receipt adds to the stripe once, the fence finds the receipt (committed) and the
    settle lends once; a late receipt of a fenced grant is refused."""
    phone = await striped_phone(saga, 300)
    grant_id, reserved = await grant(saga, phone, 32)
    await grant(saga, phone, 32, grant_id)
    head = decode_grant(reserved.payload["reservation"])
    assert head is not None

    async def receive(some_grant: str) -> tuple[int, dict]:
        result = await stripes.receive_grant(
            saga.scripts,
            host=HOST,
            phone_id=phone,
            grant_id=some_grant,
            units=32,
            price_cents=700,
            gen=head.gen,
        )
        return result.status, result.payload

    assert (await receive(grant_id))[0] == 200
    assert (await receive(grant_id))[0] == 200
    assert await saga.redis.hmget(keys.stripe(HOST, phone), "stock", "got", "price_cents") == [
        "32",
        "32",
        "700",
    ]
    assert await steps.fence_grants(saga.scripts, HOST, [grant_id]) == [steps.COMMITTED]
    assert not await saga.redis.hexists(keys.aborts(HOST), grant_id)
    for _ in range(2):
        await steps.settle(
            saga.scripts,
            PHONE_PARTITION,
            grant_id,
            steps.COMMITTED,
            reserved.payload["reservation"],
        )
    assert await units(saga, phone) == {"stock": 268, "held": 0, "sold": 0, "lent": 32}
    # Another grant fenced before its receipt: the receipt is refused, nothing added.
    fenced_id, fenced = await grant(saga, phone, 8)
    assert await steps.fence_grants(saga.scripts, HOST, [fenced_id]) == [steps.ABORTED]
    assert await receive(fenced_id) == (503, {"code": "service_unavailable"})
    await steps.settle(
        saga.scripts, PHONE_PARTITION, fenced_id, steps.ABORTED, fenced.payload["reservation"]
    )
    assert await units(saga, phone) == {"stock": 268, "held": 0, "sold": 0, "lent": 32}
    assert await saga.redis.hget(keys.stripe(HOST, phone), "got") == "32"


@pytest.mark.parametrize("saga", ["cluster"], indirect=True)
async def test_a_grants_units_stay_held_until_its_fence_is_acknowledged_by_the_replica(
    saga: SagaWorld, redis_cluster: LocalCluster
) -> None:
    """As for an order (tests/test_settler.py): a fence lost with the host's primary would
    let the grant's late receipt through after its units went back to the pool (a unit in
    a stripe and in the pool at once), so the release waits for the host's replica to have
    the marker. Replica frozen: the sweep settles nothing; thawed: the units come back."""
    phone = await striped_phone(saga, 200)
    grant_id, _ = await grant(saga, phone, 16)
    due = int(time.time() * 1000) + 60_000  # swept as if its expiry had come
    await saga.redis.zadd(keys.reservations_due(PHONE_PARTITION), {grant_id: due - 1})
    view = redis_cluster.topology()
    host_primary = view.primary_for_slot(key_slot(keys.aborts(HOST).encode()))
    (replica,) = view.replicas_of(host_primary)
    settler = Settler(saga.gateway, saga.scripts)

    redis_cluster.procs[replica.port].send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(WriteUnconfirmed):
            await settler.sweep(due)
        assert await saga.redis.hget(keys.aborts(HOST), grant_id) == "swept"
        assert await units(saga, phone) == {"stock": 184, "held": 16, "sold": 0, "lent": 0}
    finally:
        redis_cluster.procs[replica.port].send_signal(signal.SIGCONT)

    async def released() -> bool:
        with contextlib.suppress(WriteUnconfirmed):
            await settler.sweep(due)
        return (await units(saga, phone))["held"] == 0

    await wait_until_async(released, "the sweep after the replica is back", 60)
    assert await units(saga, phone) == {"stock": 200, "held": 0, "sold": 0, "lent": 0}
    assert await saga.redis.smembers(keys.grants_in_flight(phone)) == set()
    await asyncio.to_thread(redis_cluster.wait_healthy)


async def test_a_receipt_past_its_grants_expiry_is_refused_and_one_made_before_is_answered(
    saga: SagaWorld,
) -> None:
    """The receipt carries the grant's expiry (app/orders/grants.py): past it, when the
    settler may have fenced the grant and pruned the marker since, a receipt not yet made
    is refused with nothing written; one made in time is answered again (a retry)."""
    phone = await striped_phone(saga, 300)
    late_id, late = await grant(saga, phone, 8)
    made_id, made = await grant(saga, phone, 8)
    past = int(time.time() * 1000) - 1

    async def receive(grant_id: str, expires_at_ms: int) -> int:
        result = await stripes.receive_grant(
            saga.scripts,
            host=HOST,
            phone_id=phone,
            grant_id=grant_id,
            units=8,
            price_cents=700,
            gen=3,
            expires_at_ms=expires_at_ms,
        )
        return result.status

    assert await receive(made_id, LATER_MS) == 200
    assert await receive(made_id, past) == 200  # received before: answered, not refused
    assert await receive(late_id, past) == 503
    assert not await saga.redis.hexists(keys.grant_receipts(HOST), late_id)
    assert await saga.redis.hget(keys.stripe(HOST, phone), "got") == "8"
    # The fence then decides each by its receipt.
    assert await steps.fence_grants(saga.scripts, HOST, [made_id, late_id]) == [
        steps.COMMITTED,
        steps.ABORTED,
    ]
    assert late.status == made.status == 200
