"""Stripes for the recall's tests (docs/escrow.md, section 4), made by the REAL grant:
reserve_grant.lua on the pool, receive_grant.lua on the host, settle_reservation.lua
(committed: held -> lent), through the app's own calls (app/orders/saga.py,
app/orders/stripes.py). Two things are staged by hand, TEST-ONLY, and labelled so:

- the phone's ``mode = striped`` (set by hand so that a test needs no run of hot apart
  orders to stripe it; the grant only reads the mode);
- ``sell_from_stripe``: what a stripe order does to its stripe's units (stock -> sold,
  and the host ledger's), for the script tests only, until the stripe order is on main
  (the race tests sell from the pool, where every unit has its order).
"""

from __future__ import annotations

from typing import Any

from app import keys, partitions
from app.orders import saga, stripes
from app.partitions import partition_of
from app.scripts import Scripts
from app.vocabulary import STRIPED, decode_grant, decode_items

FAR_MS = 10**13  # a grant's expiry no sweep reaches during a test


async def grant(
    scripts: Scripts,
    redis: Any,
    phone_id: str,
    host: int,
    units: int,
    *,
    received: bool = True,
    settled: bool = True,
) -> str:
    """A grant of ``units`` of the phone to the stripe on ``host``: reserved on the pool,
    then received on the host and settled on the pool unless told not to. Its grant id."""
    await redis.hset(keys.phone(phone_id), "mode", STRIPED)  # TEST-ONLY: striped by hand
    grant_id = partitions.new_id(host)
    reserved = await saga.reserve_grant(
        scripts, grant_id, phone_id, units, FAR_MS, floor=0, shares=1, minimum=1
    )
    assert reserved.status == 200 and int(reserved.payload["units"]) == units, reserved.payload
    stored = reserved.payload["reservation"]
    if received:
        reservation = decode_grant(stored)
        assert reservation is not None
        [line] = decode_items(reservation.lines)
        receipt = await stripes.receive_grant(
            scripts,
            host=host,
            phone_id=phone_id,
            grant_id=grant_id,
            units=units,
            price_cents=line.unit_price_cents,
            gen=reservation.gen,
        )
        assert receipt.status == 200, receipt.payload
    if settled:
        outcome = saga.COMMITTED if received else saga.ABORTED
        result = await saga.settle(scripts, partition_of(phone_id), grant_id, outcome, stored)
        assert result["settled"] == "1", result
    return grant_id


async def sell_from_stripe(redis: Any, host: int, phone_id: str, units: int) -> None:
    """TEST-ONLY: a stripe order's move of the stripe's units, without the order."""
    stripe = keys.stripe(host, phone_id)
    await redis.hincrby(stripe, "stock", -units)
    await redis.hincrby(stripe, "sold", units)
    await redis.hincrby(keys.ledger(host), "stripe_units", -units)
    await redis.hincrby(keys.ledger(host), "stripe_sold_units", units)
