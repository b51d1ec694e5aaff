"""A restock's ceiling counts the units a striped phone lent (docs/escrow.md, section 6):
lent units come home with a recall, so a restock may not fill the ceiling with them out,
or that recall would cross it. On one redis-server and the 3+3 cluster (the saga's world,
tests/saga_fixtures.py), the grant reserved and settled by the real scripts."""

from __future__ import annotations

from app import keys, partitions
from app.orders import saga as steps
from app.vocabulary import STRIPED
from tests.saga_fixtures import ORDER_PARTITION, PHONE_PARTITION, SagaWorld

LATER_MS = 10**13  # an expiry no sweep reaches during the test


async def test_a_restock_counts_lent_units_against_the_ceiling(saga: SagaWorld) -> None:
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=100)
    await saga.redis.hset(keys.phone(phone), "mode", STRIPED)
    grant_id = partitions.new_id(ORDER_PARTITION)
    granted = await steps.reserve_grant(
        saga.scripts, grant_id, phone, 16, LATER_MS, floor=64, shares=2, minimum=8
    )
    assert granted.status == 200, granted.payload
    settled = await steps.settle(
        saga.scripts, PHONE_PARTITION, grant_id, steps.COMMITTED, granted.payload["reservation"]
    )
    assert settled["settled"] == "1"
    stock, held, lent = await saga.redis.hmget(keys.phone(phone), "stock", "held", "lent")
    assert (stock, int(held or 0), lent) == ("84", 0, "16")

    ceiling = 110
    ledger = keys.ledger(PHONE_PARTITION)
    # stock 84 + lent 16: 11 more would make 111 once the stripe's units come home.
    refused = await saga.scripts.call("restock", [keys.phone(phone), ledger], [11, ceiling])
    assert (refused.status, refused.payload) == (
        409,
        {"code": "stock_limit", "stock": "84", "limit": str(ceiling)},
    )
    assert await saga.redis.hget(keys.phone(phone), "stock") == "84"
    allowed = await saga.scripts.call("restock", [keys.phone(phone), ledger], [10, ceiling])
    assert allowed.status == 200
    assert await saga.redis.hmget(keys.phone(phone), "stock", "lent", "added_units") == [
        "94",
        "16",
        "110",
    ]
