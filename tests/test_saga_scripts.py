"""The reservation saga's scripts (docs/data-tier.md, section 3) on one redis-server and on
the real cluster, with the order's partition and the phones' on different primaries:
each is idempotent by order id (run twice: the same answer, no double effect), refusals
write nothing, a late reserve after a release is refused, and at rest every phone keeps
stock + held + sold = added_units (section 5)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from app import keys, partitions
from app.orders import saga as steps
from app.vocabulary import OPEN, ORDER_FIELDS, encode_items
from tests.saga_fixtures import (
    ORDER_PARTITION,
    OTHER_PHONE_PARTITION,
    PHONE_PARTITION,
    SagaWorld,
)

LATER_MS = 10**13  # an expiry no sweep reaches during a test


def order_id() -> str:
    return partitions.new_id(ORDER_PARTITION)


async def test_the_order_and_its_phones_live_on_different_primaries(saga: SagaWorld) -> None:
    if saga.backend == "single":
        pytest.skip("one node holds every partition")
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=1)
    other = await saga.phone(OTHER_PHONE_PARTITION, price_cents=100, stock=1)
    nodes = {
        saga.node_of(keys.aborts(ORDER_PARTITION)),
        saga.node_of(keys.phone(phone)),
        saga.node_of(keys.phone(other)),
    }
    assert len(nodes) == 3
    # Every saga key of a partition is in that partition's one slot, beside its phones.
    assert saga.node_of(keys.reservations(PHONE_PARTITION)) == saga.node_of(keys.phone(phone))


async def test_reserve_holds_stock_once_and_a_second_run_answers_the_same(
    saga: SagaWorld,
) -> None:
    phone = await saga.phone(PHONE_PARTITION, price_cents=1250, stock=5)
    order = order_id()
    first = await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 2)], LATER_MS)
    second = await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 2)], LATER_MS)
    assert (first.status, first.flag) == (200, False)
    assert (second.status, second.flag) == (200, True)
    assert first.payload == second.payload == {"lines": encode_items([(phone, 2, 1250)])}
    assert await saga.units(phone) == {"stock": 3, "held": 2, "sold": 0, "added": 5}
    assert await saga.redis.zscore(keys.reservations_due(PHONE_PARTITION), order) == LATER_MS
    ledger = await saga.ledger(PHONE_PARTITION)
    assert (ledger["stock_units"], ledger["held_units"], ledger["changes"]) == (-2, 2, 1)


async def test_reserve_refusals_write_nothing(saga: SagaWorld) -> None:
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=1)
    missing = partitions.new_id(PHONE_PARTITION)
    order = order_id()
    not_found = await steps.reserve(
        saga.scripts, order, PHONE_PARTITION, [(phone, 1), (missing, 1)], LATER_MS
    )
    assert (not_found.status, not_found.payload) == (
        404,
        {"code": "phone_not_found", "phone_ids": [missing]},
    )
    short = await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 2)], LATER_MS)
    assert short.status == 409
    assert short.payload["lines"] == [{"phone_id": phone, "requested": "2", "available": "1"}]
    assert await saga.units(phone) == {"stock": 1, "held": 0, "sold": 0, "added": 1}
    assert await saga.redis.hlen(keys.reservations(PHONE_PARTITION)) == 0
    assert await saga.ledger(PHONE_PARTITION) == {}


async def test_settle_committed_moves_held_to_sold_once(saga: SagaWorld) -> None:
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=4)
    order = order_id()
    lines = (
        await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 3)], LATER_MS)
    ).payload["lines"]
    first = await steps.settle(saga.scripts, PHONE_PARTITION, order, steps.COMMITTED, lines)
    second = await steps.settle(saga.scripts, PHONE_PARTITION, order, steps.COMMITTED, "")
    assert first == {"outcome": "committed", "settled": "1"}
    assert second == {"outcome": "committed", "settled": "0"}
    assert await saga.units(phone) == {"stock": 1, "held": 0, "sold": 3, "added": 4}
    assert await saga.redis.zcard(keys.reservations_due(PHONE_PARTITION)) == 0
    assert not await saga.redis.hexists(keys.releases(PHONE_PARTITION), order)


async def test_settle_with_stale_lines_rereads_the_reservation(saga: SagaWorld) -> None:
    """The caller saw no reservation, and a late reserve landed before its settle: the
    script answers the stored lines and the step settles those."""
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=4)
    order = order_id()
    await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 1)], LATER_MS)
    settled = await steps.settle(saga.scripts, PHONE_PARTITION, order, steps.ABORTED, "")
    assert settled == {"outcome": "aborted", "settled": "1"}
    assert await saga.units(phone) == {"stock": 4, "held": 0, "sold": 0, "added": 4}


async def test_one_call_settles_several_orders_each_once(saga: SagaWorld) -> None:
    """The order path's batch: orders of one partition, committed and aborted, one of
    them named twice and one already settled, in one call; each moves exactly once."""
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=10)
    other = await saga.phone(PHONE_PARTITION, price_cents=100, stock=10)
    orders = [order_id() for _ in range(3)]
    lines = [
        (
            await steps.reserve(
                saga.scripts, order, PHONE_PARTITION, [(phone, 1), (other, 2)], LATER_MS
            )
        ).payload["lines"]
        for order in orders
    ]
    await steps.settle(saga.scripts, PHONE_PARTITION, orders[2], steps.COMMITTED, lines[2])
    results = await steps.settle_many(
        saga.scripts,
        PHONE_PARTITION,
        [
            (orders[0], steps.COMMITTED, lines[0]),
            (orders[1], steps.ABORTED, lines[1]),
            (orders[0], steps.COMMITTED, lines[0]),
            (orders[2], steps.COMMITTED, ""),
        ],
    )
    assert results == [
        {"outcome": "committed", "settled": "1"},
        {"outcome": "aborted", "settled": "1"},
        {"outcome": "committed", "settled": "0"},
        {"outcome": "committed", "settled": "0"},
    ]
    assert await saga.units(phone) == {"stock": 8, "held": 0, "sold": 2, "added": 10}
    assert await saga.units(other) == {"stock": 6, "held": 0, "sold": 4, "added": 10}
    assert await saga.redis.hkeys(keys.releases(PHONE_PARTITION)) == [orders[1]]
    ledger = await saga.ledger(PHONE_PARTITION)
    assert (ledger.get("held_units", 0), ledger["sold_units"], ledger["stock_units"]) == (0, 6, -6)


async def test_a_batch_with_a_broken_invariant_writes_nothing(saga: SagaWorld) -> None:
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=10)
    first, second = order_id(), order_id()
    lines = [
        (await steps.reserve(saga.scripts, o, PHONE_PARTITION, [(phone, 3)], LATER_MS)).payload[
            "lines"
        ]
        for o in (first, second)
    ]
    # Something outside the scripts took held units away: 6 reserved, 4 held.
    await saga.redis.hincrby(keys.phone(phone), "held", -2)
    before = await saga.units(phone)
    results = await steps.settle_many(
        saga.scripts,
        PHONE_PARTITION,
        [(first, steps.COMMITTED, lines[0]), (second, steps.ABORTED, lines[1])],
    )
    assert [result["code"] for result in results] == ["held_short", "held_short"]
    assert results[0]["phone_id"] == phone
    assert await saga.units(phone) == before
    assert await saga.redis.hlen(keys.reservations(PHONE_PARTITION)) == 2
    assert not await saga.redis.exists(keys.releases(PHONE_PARTITION))


async def test_abort_gives_stock_back_once_and_a_late_reserve_is_refused(
    saga: SagaWorld,
) -> None:
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=2)
    order = order_id()
    lines = (
        await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 2)], LATER_MS)
    ).payload["lines"]
    first = await steps.settle(saga.scripts, PHONE_PARTITION, order, steps.ABORTED, lines)
    again = await steps.settle(saga.scripts, PHONE_PARTITION, order, steps.ABORTED, "")
    assert (first["settled"], again["settled"]) == ("1", "0")
    assert await saga.units(phone) == {"stock": 2, "held": 0, "sold": 0, "added": 2}
    # Anti-suspension: the same order's try, arriving after its cancel, holds nothing.
    late = await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 2)], LATER_MS)
    assert (late.status, late.payload) == (409, {"code": "order_released"})
    assert await saga.units(phone) == {"stock": 2, "held": 0, "sold": 0, "added": 2}


async def test_an_abort_where_nothing_was_reserved_still_refuses_the_late_reserve(
    saga: SagaWorld,
) -> None:
    """The reserve that timed out on the app's side reaches Redis after the release."""
    phone = await saga.phone(OTHER_PHONE_PARTITION, price_cents=100, stock=2)
    order = order_id()
    released = await steps.settle(saga.scripts, OTHER_PHONE_PARTITION, order, steps.ABORTED, "")
    assert released == {"outcome": "aborted", "settled": "0"}
    late = await steps.reserve(saga.scripts, order, OTHER_PHONE_PARTITION, [(phone, 1)], LATER_MS)
    assert late.payload == {"code": "order_released"}
    assert await saga.units(phone) == {"stock": 2, "held": 0, "sold": 0, "added": 2}


async def test_fence_aborts_an_order_that_does_not_exist_and_says_so_again(
    saga: SagaWorld,
) -> None:
    absent = order_id()
    assert await steps.fence(saga.scripts, ORDER_PARTITION, [absent]) == [steps.ABORTED]
    assert await saga.redis.hget(keys.aborts(ORDER_PARTITION), absent) == "swept"
    assert await steps.fence(saga.scripts, ORDER_PARTITION, [absent]) == [steps.ABORTED]
    assert await saga.redis.hlen(keys.aborts(ORDER_PARTITION)) == 1


async def test_fence_after_the_commit_says_committed_and_writes_no_marker(
    saga: SagaWorld,
) -> None:
    committed, absent = order_id(), order_id()
    # The commit's one trace the fence reads: the order hash exists.
    await saga.redis.hset(keys.order(committed), mapping={ORDER_FIELDS["status"]: OPEN})
    outcomes = await steps.fence(saga.scripts, ORDER_PARTITION, [committed, absent])
    assert outcomes == [steps.COMMITTED, steps.ABORTED]
    assert await saga.redis.hkeys(keys.aborts(ORDER_PARTITION)) == [absent]


async def test_return_stock_gives_sold_units_back_once(saga: SagaWorld) -> None:
    phone = await saga.phone(PHONE_PARTITION, price_cents=700, stock=3)
    order = order_id()
    lines = (
        await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 2)], LATER_MS)
    ).payload["lines"]
    await steps.settle(saga.scripts, PHONE_PARTITION, order, steps.COMMITTED, lines)
    first = await steps.return_stock(saga.scripts, PHONE_PARTITION, order, lines)
    second = await steps.return_stock(saga.scripts, PHONE_PARTITION, order, lines)
    assert first.payload == {"returned": "1", "units": "2", "from": "sold"}
    assert second.payload == {"returned": "0"}
    assert await saga.units(phone) == {"stock": 3, "held": 0, "sold": 0, "added": 3}
    assert await saga.redis.sismember(keys.taken_back(PHONE_PARTITION), order)


async def test_return_stock_settles_a_still_held_reservation_first(saga: SagaWorld) -> None:
    """Cancelled before its reservation was settled (the app died after the commit)."""
    phone = await saga.phone(PHONE_PARTITION, price_cents=700, stock=3)
    order = order_id()
    lines = (
        await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 2)], LATER_MS)
    ).payload["lines"]
    returned = await steps.return_stock(saga.scripts, PHONE_PARTITION, order, lines)
    assert returned.payload == {"returned": "1", "units": "2", "from": "held"}
    assert await saga.units(phone) == {"stock": 3, "held": 0, "sold": 0, "added": 3}
    assert await saga.redis.hlen(keys.reservations(PHONE_PARTITION)) == 0
    # The settle that the dead app owed now finds nothing to move.
    late = await steps.settle(saga.scripts, PHONE_PARTITION, order, steps.COMMITTED, "")
    assert late["settled"] == "0"
    assert await saga.units(phone) == {"stock": 3, "held": 0, "sold": 0, "added": 3}


async def test_return_stock_refuses_more_than_was_sold_and_writes_nothing(
    saga: SagaWorld,
) -> None:
    phone = await saga.phone(PHONE_PARTITION, price_cents=700, stock=3)
    order = order_id()
    refused = await steps.return_stock(
        saga.scripts, PHONE_PARTITION, order, encode_items([(phone, 1, 700)])
    )
    assert refused.status == 409
    assert refused.payload["code"] == "sold_short"
    assert await saga.units(phone) == {"stock": 3, "held": 0, "sold": 0, "added": 3}
    assert not await saga.redis.exists(keys.taken_back(PHONE_PARTITION))


async def test_at_rest_every_phone_keeps_stock_held_sold_equal_to_added(
    saga: SagaWorld,
) -> None:
    """A mix of every step, each run twice as a retried call would, over two phone
    partitions on two primaries; at rest the identities of section 5 hold per phone,
    and each partition's ledger moved exactly as its phones did."""
    phones = {
        PHONE_PARTITION: await saga.phone(PHONE_PARTITION, price_cents=300, stock=9),
        OTHER_PHONE_PARTITION: await saga.phone(OTHER_PHONE_PARTITION, price_cents=500, stock=7),
    }
    outcomes = [steps.COMMITTED, steps.ABORTED, steps.COMMITTED, steps.COMMITTED, steps.ABORTED]
    committed_units = dict.fromkeys(phones, 0)
    for number, outcome in enumerate(outcomes):
        order = order_id()
        quantity = number % 2 + 1
        groups = steps.lines_by_partition([(phone, quantity) for phone in phones.values()])
        reserved = {}
        for partition, lines in groups.items():
            for _ in range(2):
                answer = await steps.reserve(saga.scripts, order, partition, lines, LATER_MS)
            reserved[partition] = answer.payload["lines"]
        for _ in range(2):
            outcome_now = (await steps.fence(saga.scripts, ORDER_PARTITION, [order]))[0]
            assert outcome_now == steps.ABORTED  # no commit ran: the fence aborts
        for partition, lines in reserved.items():
            for _ in range(2):
                await steps.settle(saga.scripts, partition, order, outcome, lines)
            if outcome == steps.COMMITTED:
                committed_units[partition] += quantity
        if number == 3:  # this one is cancelled afterwards: its stock comes back
            for partition, lines in reserved.items():
                for _ in range(2):
                    await steps.return_stock(saga.scripts, partition, order, lines)
                committed_units[partition] -= quantity
    for partition, phone in phones.items():
        units = await saga.units(phone)
        assert units["held"] == 0
        assert units["stock"] + units["held"] + units["sold"] == units["added"], units
        assert units["sold"] == committed_units[partition]
        ledger = await saga.ledger(partition)
        assert ledger.get("held_units", 0) == 0
        assert ledger.get("sold_units", 0) == units["sold"]
        assert ledger["stock_units"] == units["stock"] - units["added"]
        assert await saga.redis.zcard(keys.reservations_due(partition)) == 0


async def test_reserve_answers_prices_read_with_the_units(saga: SagaWorld) -> None:
    """The unit price is the phone's at the reserve; a later price change does not move it."""
    phone = await saga.phone(PHONE_PARTITION, price_cents=999, stock=1)
    order = order_id()
    reserved = await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 1)], LATER_MS)
    await saga.redis.hset(keys.phone(phone), "price_cents", 5)
    again = await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(phone, 1)], LATER_MS)
    assert reserved.payload == again.payload == {"lines": encode_items([(phone, 1, 999)])}


async def test_racing_reserves_hold_exactly_the_stock(saga: SagaWorld) -> None:
    """The oversell race at the saga's try step: reserves of one phone serialise on its
    partition (on the cluster: its primary), so 200 at once against stock 10 hold 10."""
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=10)
    answers = await asyncio.gather(
        *(
            steps.reserve(saga.scripts, order_id(), PHONE_PARTITION, [(phone, 1)], LATER_MS)
            for _ in range(200)
        )
    )
    assert Counter(answer.status for answer in answers) == {200: 10, 409: 190}
    assert await saga.units(phone) == {"stock": 0, "held": 10, "sold": 0, "added": 10}
    assert await saga.redis.hlen(keys.reservations(PHONE_PARTITION)) == 10


async def test_a_restock_counts_held_units_against_the_ceiling(saga: SagaWorld) -> None:
    """Held units return to stock if their order aborts: a restock may not fill the
    ceiling with them outside, or that release would cross it."""
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=10)
    await steps.reserve(saga.scripts, order_id(), PHONE_PARTITION, [(phone, 4)], LATER_MS)
    ceiling = 20
    ledger = keys.ledger(PHONE_PARTITION)
    # stock 6 + held 4: 11 more would make 21 once the reservation is released.
    refused = await saga.scripts.call("restock", [keys.phone(phone), ledger], [11, ceiling])
    assert (refused.status, refused.payload.get("code")) == (409, "stock_limit")
    allowed = await saga.scripts.call("restock", [keys.phone(phone), ledger], [10, ceiling])
    assert allowed.status == 200
    assert await saga.units(phone) == {"stock": 16, "held": 4, "sold": 0, "added": 20}
