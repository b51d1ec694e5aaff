"""A striped phone's price (docs/escrow.md, section 6): after a PATCH's 200 every stripe
sells at the new price; a request that died is finished by the settler's sweep of
``sp{Q}``; a late reprice never undoes a newer price. On one redis-server (no stripe
ever) and for an unstriped phone a PATCH is what it was: one script, one round trip.

Stripes are made on the session's 3+3 cluster, on the host partitions of the other
primaries than the phone's, by the real receipt (tests/stripe_fixtures.py: grant)."""

from __future__ import annotations

import time

import pytest
from redis.asyncio import Redis

from app import appkeys, keys
from app.orders import saga, stripes
from app.partitions import new_id, partition_of
from app.phones.service import update_phone_keys
from app.redis_gateway import RedisGateway
from app.scripts import Scripts
from app.vocabulary import ORDER_FIELDS, encode_grant, encode_items, stripe_mark
from loadtests.support.round_trips import CountingTransport
from tests.helpers import ADMIN, CLUSTER, ONE_NODE, Shop, customer_apart_from, other_hosts, timed
from tests.stripe_fixtures import grant

LATER_MS = 10**13  # a grant's expiry no sweep reaches during a test
ON_CLUSTER = pytest.mark.parametrize(
    "stack_kind", [pytest.param(CLUSTER, marks=pytest.mark.cluster)], indirect=True
)


async def _stripe(redis: Redis, host: int, phone_id: str) -> dict[str, str]:
    row = await redis.hgetall(keys.stripe(host, phone_id))
    return {k.decode(): v.decode() for k, v in row.items()}


async def _patch(shop: Shop, phone_id: str, body: dict) -> dict:
    response = await shop.client.patch(f"/phones/{phone_id}", json=body, headers=ADMIN)
    assert response.status == 200, await response.text()
    return (await response.json())["phone"]


async def _striped_phone(
    shop: Shop, redis: Redis, price_cents: int = 1_000
) -> tuple[str, list[int]]:
    """A phone of 200 units with a stripe of 16 on each other primary's host partition."""
    phone = await shop.phone(price_cents=price_cents, stock=200)
    hosts = other_hosts(shop.client.app[appkeys.REDIS_GATEWAY], phone["id"])
    for host in hosts:
        await _grant(shop, redis, phone["id"], host, 16, price_cents, 0)
    return phone["id"], hosts


async def _grant(
    shop: Shop, redis: Redis, phone_id: str, host: int, units: int, price_cents: int, gen: int
) -> dict:
    scripts = shop.client.app[appkeys.SCRIPTS]
    received = await grant(
        redis, scripts, phone_id=phone_id, host=host, units=units, price_cents=price_cents, gen=gen
    )
    assert (received.status, received.flag) == (200, True), received.payload
    return received.payload


@ON_CLUSTER
async def test_after_a_patchs_200_every_stripe_has_the_new_price(shop: Shop, redis: Redis) -> None:
    phone_id, hosts = await _striped_phone(shop, redis)
    assert len(hosts) == 2
    for host in hosts:
        assert (await _stripe(redis, host, phone_id))["price_cents"] == "1000"

    answered = await _patch(shop, phone_id, {"price_cents": 1_250})
    assert answered["price_cents"] == 1_250
    for host in hosts:
        stripe = await _stripe(redis, host, phone_id)
        assert (stripe["price_cents"], stripe["gen"], stripe["stock"]) == ("1250", "1", "16")
    assert await redis.hget(keys.phone(phone_id), "gen") == b"1"
    # Done before the 200: nothing left for the settler.
    assert await redis.zcard(keys.reprices_due(partition_of(phone_id))) == 0

    # A second change, then one that names the same price again: the generation moves
    # only with the price; the stripes follow each.
    await _patch(shop, phone_id, {"price_cents": 900, "name": "cheaper"})
    await _patch(shop, phone_id, {"price_cents": 900})
    for host in hosts:
        stripe = await _stripe(redis, host, phone_id)
        assert (stripe["price_cents"], stripe["gen"]) == ("900", "2")
    assert await redis.hget(keys.phone(phone_id), "gen") == b"2"


@ON_CLUSTER
async def test_a_patch_without_a_price_leaves_the_stripes_alone(shop: Shop, redis: Redis) -> None:
    phone_id, hosts = await _striped_phone(shop, redis)
    before = [await _stripe(redis, host, phone_id) for host in hosts]
    await _patch(shop, phone_id, {"name": "renamed", "description": "new"})
    assert [await _stripe(redis, host, phone_id) for host in hosts] == before
    assert await redis.hget(keys.phone(phone_id), "gen") is None
    assert await redis.zcard(keys.reprices_due(partition_of(phone_id))) == 0


@ON_CLUSTER
async def test_the_settler_finishes_a_price_change_whose_request_died(
    shop: Shop, redis: Redis
) -> None:
    """update_phone.lua ran (the price is written on the phone's partition), the app died
    before any reprice: the stripes still sell at the old price, the entry is due on
    sp{Q}; the settler's sweep writes the phone's price to them and takes the entry off."""
    phone_id, hosts = await _striped_phone(shop, redis)
    scripts = shop.client.app[appkeys.SCRIPTS]
    due = int(time.time() * 1000) + 3_600_000  # not due for the app's own settler
    result = await scripts.run(
        "update_phone",
        update_phone_keys(phone_id),
        [keys.reprice_entry(phone_id), due, "price_cents", 1_500],
    )
    assert result.more == {
        "gen": "1",
        "price_cents": "1500",
        "hosts": sorted(result.more["hosts"]),
        "due": keys.reprice_entry(phone_id, 1),
    }
    assert sorted(int(h) for h in result.more["hosts"]) == sorted(hosts)
    sp = keys.reprices_due(partition_of(phone_id))
    assert await redis.zrange(sp, 0, -1, withscores=True) == [
        (keys.reprice_entry(phone_id, 1).encode(), due)
    ]
    for host in hosts:
        assert (await _stripe(redis, host, phone_id))["price_cents"] == "1000"

    settler = shop.client.app[appkeys.SETTLER]
    assert await settler.sweep(now_ms=due - 1) == 0  # not due yet: nothing
    assert (await _stripe(redis, hosts[0], phone_id))["price_cents"] == "1000"
    assert await settler.sweep(now_ms=due) >= 1
    for host in hosts:
        stripe = await _stripe(redis, host, phone_id)
        assert (stripe["price_cents"], stripe["gen"]) == ("1500", "1")
    assert await redis.zcard(sp) == 0


@ON_CLUSTER
async def test_a_late_reprice_never_undoes_a_newer_price(shop: Shop, redis: Redis) -> None:
    """reprice_stripe applies a newer generation only: the same one again and an older
    one write nothing. A grant reserved before the change (its host in sh{Q}X, its
    receipt still to come, carrying the older generation and price): the PATCH makes its
    stripe empty at the new price, and the receipt adds its units and keeps that price."""
    phone = await shop.phone(price_cents=1_000, stock=200)
    gateway = shop.client.app[appkeys.REDIS_GATEWAY]
    scripts = shop.client.app[appkeys.SCRIPTS]
    host, late_host = other_hosts(gateway, phone["id"])
    phone_id = phone["id"]
    await _grant(shop, redis, phone_id, host, 16, 1_000, 0)
    grant_id = new_id(late_host)
    reserved = await saga.reserve_grant(
        scripts, grant_id, phone_id, 8, LATER_MS, floor=64, shares=2, minimum=8
    )
    assert reserved.status == 200, reserved.payload
    assert reserved.payload["reservation"] == encode_grant(
        late_host, 0, encode_items([(phone_id, 8, 1_000)])
    )

    await _patch(shop, phone_id, {"price_cents": 2_000})  # gen 1
    await _patch(shop, phone_id, {"price_cents": 3_000})  # gen 2
    for gen, price in ((1, 2_000), (2, 3_000), (0, 1_000)):
        late = await scripts.run("reprice_stripe", [keys.stripe(host, phone_id)], [gen, price])
        assert (late.flag, late.payload) == (False, {"gen": "2", "price_cents": "3000"})
    assert (await _stripe(redis, host, phone_id))["price_cents"] == "3000"
    made = await _stripe(redis, late_host, phone_id)
    assert made == {
        "gen": "2",
        "price_cents": "3000",
        "stock": "0",
        "sold": "0",
        "got": "0",
        "epoch": "0",
    }
    received = await stripes.receive_grant(
        scripts,
        host=late_host,
        phone_id=phone_id,
        grant_id=grant_id,
        units=8,
        price_cents=1_000,
        gen=0,
    )
    assert (received.status, received.flag) == (200, True)
    stripe = await _stripe(redis, late_host, phone_id)
    assert (stripe["price_cents"], stripe["gen"], stripe["stock"], stripe["got"]) == (
        "3000",
        "2",
        "8",
        "8",
    )


@pytest.mark.parametrize(
    "stack_kind", [ONE_NODE, pytest.param(CLUSTER, marks=pytest.mark.cluster)], indirect=True
)
async def test_an_unstriped_phones_patch_is_one_script_and_nothing_else(
    shop: Shop, redis: Redis, stack_kind: str
) -> None:
    phone = await shop.phone(price_cents=1_000, stock=5)
    labels = ("script:update_phone", "script:reprice_stripe", "ZREM")
    before = [timed(label) for label in labels]
    answered = await _patch(shop, phone["id"], {"price_cents": 1_100})
    # The script only: no reprice, no ZREM.
    assert [timed(label) - b for label, b in zip(labels, before, strict=True)] == [1, 0, 0]
    assert answered["price_cents"] == 1_100
    assert await redis.hget(keys.phone(phone["id"]), "gen") == b"1"
    assert await redis.zcard(keys.reprices_due(partition_of(phone["id"]))) == 0
    if stack_kind == ONE_NODE:
        # The same at the transport: one round trip, one command.
        counting = CountingTransport(redis)
        scripts = Scripts(RedisGateway(counting))
        due = int(time.time() * 1000)
        await scripts.run(
            "update_phone",
            update_phone_keys(phone["id"]),
            [keys.reprice_entry(phone["id"]), due, "price_cents", 7],
        )
        assert (counting.round_trips, counting.commands) == (1, 1)


@ON_CLUSTER
async def test_after_a_patchs_200_an_order_from_a_stripe_pays_the_new_price(
    shop: Shop, redis: Redis
) -> None:
    """The promise itself: a customer whose primary hosts a stripe of the phone orders it
    right after the PATCH's 200, from the stripe (place_from_stripe.lua), at the new price."""
    gateway = shop.client.app[appkeys.REDIS_GATEWAY]
    phone = await shop.phone(price_cents=1_000, stock=200)
    customer, auth, host = await customer_apart_from(shop, gateway, phone["id"])
    await _grant(shop, redis, phone["id"], host, 16, 1_000, 0)

    await _patch(shop, phone["id"], {"price_cents": 1_234})
    response = await shop.order(auth, [(phone["id"], 2)], autocheck=False)
    assert response.status == 201, await response.text()
    order = (await response.json())["order"]
    assert [(item["unit_price_cents"], item["quantity"]) for item in order["items"]] == [(1_234, 2)]
    assert order["total_cents"] == 2_468
    # From the stripe, not the pool.
    assert (
        await redis.hget(keys.order(order["id"]), ORDER_FIELDS["stripe"])
        == stripe_mark(host, 0).encode()
    )
    assert await redis.hmget(keys.stripe(host, phone["id"]), "stock", "sold") == [b"14", b"2"]
    assert await redis.hget(keys.customer(customer["id"]), "balance_cents") == b"97532"
