"""Escrow's 409 rule (docs/escrow.md, section 5) in reserve_stock.lua and place_order.lua,
on one redis-server and on the real 3+3 cluster: a short pool answers out_of_stock only
when its phone has no units lent to stripes; with lent > 0 it answers stock_lent and
writes nothing at all (every key the script may touch is byte for byte the same, and a
place_order with an Idempotency-Key stores no record), so the order can be sent again
after the recall.

The phones lend by the real grant (tests/escrow_staging.py), and get their units back by
the real recall (app/orders/recall.py)."""

from __future__ import annotations

import time

import pytest

from app import keys, partitions
from app.orders import recall, service
from app.orders import saga as steps
from app.orders.chunk_hints import HINTS
from app.problems import ProblemError
from tests import escrow_staging as staging
from tests.saga_fixtures import ORDER_PARTITION, OTHER_PHONE_PARTITION, PHONE_PARTITION, SagaWorld

LATER_MS = 10**13
# On the cluster's primary of ORDER_PARTITION (86-127): place_order runs collapsed there.
NEAR_PHONE_PARTITION = 110


async def lent_phone(saga: SagaWorld, partition: int, *, stock: int, lent: int) -> str:
    """A phone whose pool holds ``stock`` after lending ``lent`` units to a stripe."""
    phone_id = await saga.phone(partition, price_cents=100, stock=stock + lent)
    await staging.grant(saga.scripts, saga.redis, phone_id, OTHER_PHONE_PARTITION, lent)
    return phone_id


async def dumps(saga: SagaWorld, names: list[str]) -> dict[str, bytes | None]:
    return {name: await saga.gateway.execute("DUMP", name) for name in names}


def reserve_keys(partition: int, phone_ids: list[str]) -> list[str]:
    return [
        keys.reservations(partition),
        keys.reservations_due(partition),
        keys.releases(partition),
        keys.ledger(partition),
        *(keys.phone(phone_id) for phone_id in phone_ids),
    ]


async def test_reserve_answers_stock_lent_and_writes_nothing_while_units_are_lent(
    saga: SagaWorld,
) -> None:
    lent = await lent_phone(saga, PHONE_PARTITION, stock=2, lent=5)
    plain = await saga.phone(PHONE_PARTITION, price_cents=100, stock=1)
    watched = reserve_keys(PHONE_PARTITION, [lent, plain])
    before = await dumps(saga, watched)
    order = partitions.new_id(ORDER_PARTITION)
    refused = await steps.reserve(
        saga.scripts, order, PHONE_PARTITION, [(lent, 3), (plain, 2)], LATER_MS
    )
    assert (refused.status, refused.payload) == (409, {"code": "stock_lent", "phone_ids": [lent]})
    assert await dumps(saga, watched) == before
    # Enough in the pool: lent units change nothing.
    ok = await steps.reserve(saga.scripts, order, PHONE_PARTITION, [(lent, 2)], LATER_MS)
    assert ok.status == 200
    assert await saga.units(lent) == {"stock": 0, "held": 2, "sold": 0, "added": 7}
    # Once the recall brought the lent units home: the ordinary 409, with both short lines.
    assert (await recall.recall(saga.scripts, lent)).done
    other = partitions.new_id(ORDER_PARTITION)
    short = await steps.reserve(
        saga.scripts, other, PHONE_PARTITION, [(lent, 6), (plain, 2)], LATER_MS
    )
    assert short.status == 409
    assert short.payload["code"] == "out_of_stock"
    assert [line["phone_id"] for line in short.payload["lines"]] == [lent, plain]


async def test_place_order_answers_stock_lent_with_no_record_and_nothing_written(
    saga: SagaWorld,
) -> None:
    customer = partitions.new_id(ORDER_PARTITION)
    await saga.redis.hset(keys.customer(customer), mapping={"balance_cents": 10_000})
    phone = await lent_phone(saga, NEAR_PHONE_PARTITION, stock=1, lent=4)
    lines = [(phone, 2)]
    record, _ = service.idempotency_request(customer, lines, False, "recall-key-1", 86_400)
    order_id = partitions.new_chunked_id(ORDER_PARTITION, HINTS.current(ORDER_PARTITION))
    watched = [
        *service.place_order_keys(customer, order_id, "open", record, [phone]),
        *service.older_buckets(customer, record),
    ]
    before = await dumps(saga, watched)

    async def place() -> object:
        return await service.place_order(
            saga.scripts,
            order_id=partitions.new_chunked_id(ORDER_PARTITION, HINTS.current(ORDER_PARTITION)),
            customer_id=customer,
            lines=lines,
            autocheck=False,
            idempotency_key="recall-key-1",
            idempotency_ttl=86_400,
            request_id=f"r{time.time_ns()}",
        )

    with pytest.raises(ProblemError) as refused:
        await place()
    assert refused.value.code == "stock_lent"
    assert refused.value.status == 503
    assert refused.value.extra["phone_ids"] == [phone]
    assert await dumps(saga, [name for name in watched if name in before]) == before
    # Lent units back by the recall (the pool now 5): the same key, for 6 units, now gets
    # the ordinary 409, stored.
    assert (await recall.recall(saga.scripts, phone)).done
    lines[0] = (phone, 6)
    with pytest.raises(ProblemError) as short:
        await place()
    assert short.value.code == "out_of_stock"
    with pytest.raises(ProblemError) as replayed:
        await place()
    assert replayed.value.code == "out_of_stock"
    assert replayed.value.headers.get("Idempotent-Replayed") == "true"
