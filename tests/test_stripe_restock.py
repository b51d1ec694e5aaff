"""A restock's ceiling counts the units a striped phone lent (docs/escrow.md, section 6):
lent units come home with a recall, so a restock may not fill the ceiling with them out,
or that recall would cross it. On one redis-server and the 3+3 cluster (the saga's world,
tests/saga_fixtures.py), the grant reserved and settled by the real scripts. And a
striped phone's restock grants it to each other primary's host after the answer."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from app import appkeys, keys, partitions
from app.orders import grants
from app.orders import saga as steps
from app.vocabulary import STRIPED
from tests.helpers import ADMIN, CLUSTER, ONE_NODE, Shop, other_hosts
from tests.saga_fixtures import ORDER_PARTITION, PHONE_PARTITION, SagaWorld
from tests.stripe_fixtures import grant

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


async def _restock(shop: Shop, phone_id: str, quantity: int) -> dict:
    response = await shop.client.post(
        f"/phones/{phone_id}/restock", json={"quantity": quantity}, headers=ADMIN
    )
    assert response.status == 200, await response.text()
    return (await response.json())["phone"]


@pytest.mark.parametrize(
    "stack_kind", [pytest.param(CLUSTER, marks=pytest.mark.cluster)], indirect=True
)
async def test_a_striped_phones_restock_grants_to_every_other_primarys_host(
    shop: Shop, redis: Redis
) -> None:
    """After the restock's answer the worker's refiller grants the phone to the host of each
    primary but its own (app/orders/grants.py: stripe_everywhere), by the real scripts; an
    unstriped phone's restock grants nothing."""
    app = shop.client.app
    striped = await shop.phone(price_cents=100, stock=70)
    plain = await shop.phone(price_cents=100, stock=70)
    hosts = other_hosts(app[appkeys.REDIS_GATEWAY], striped["id"])
    # Striped, with a first stripe of 6 on one host: the pool (64) is at its floor.
    received = await grant(
        redis, app[appkeys.SCRIPTS], phone_id=striped["id"], host=hosts[0], units=6, price_cents=100
    )
    assert received.status == 200

    assert (await _restock(shop, striped["id"], 100))["stock"] == 170  # shown: 164 + 6
    await _restock(shop, plain["id"], 100)
    await app[appkeys.REFILLER].drain()
    await app[appkeys.SETTLER].drain()
    first = grants.grant_size(grants.HOT_RESERVES)  # a first grant, as for a new stripe
    granted = {(g.outcome, g.units) for g in app[appkeys.REFILLER].granted}
    assert granted == {(steps.COMMITTED, first)}, app[appkeys.REFILLER].granted
    stripes = [
        int(await redis.hget(keys.stripe(host, striped["id"]), "stock") or 0) for host in hosts
    ]
    assert stripes == [6 + first, first]
    assert await redis.hmget(keys.phone(striped["id"]), "stock", "held", "lent") == [
        str(164 - 2 * first).encode(),
        b"0",
        str(6 + 2 * first).encode(),
    ]
    assert await redis.hmget(keys.phone(plain["id"]), "stock", "lent") == [b"170", None]
    audit = await shop.audit_at_rest()
    assert audit["ok"] is True, audit["checks"]


@pytest.mark.parametrize("stack_kind", [ONE_NODE], indirect=True)
async def test_one_redis_servers_restock_grants_nothing(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(price_cents=100, stock=70)
    await redis.hset(keys.phone(phone["id"]), "mode", STRIPED)  # as if: no host to lend to
    assert (await _restock(shop, phone["id"], 100))["stock"] == 170
    await shop.client.app[appkeys.REFILLER].drain()
    assert not shop.client.app[appkeys.REFILLER].granted
    assert await redis.hmget(keys.phone(phone["id"]), "stock", "held") == [b"170", None]
