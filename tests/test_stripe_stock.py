"""The stock the API shows for a striped phone (docs/escrow.md, section 7): its pool + its
stripes' stock, on GET /phones/{id} and in the catalogue's rows, for one more round trip;
a phone that lends nothing, and every phone of one redis-server, costs what it did.

Stripes are made on the session's 3+3 cluster, on the host partitions of the other
primaries than the phone's, by the real receipt (tests/stripe_fixtures.py: grant)."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from app import appkeys, keys
from app.orders import saga
from app.partitions import new_id, partition_of
from app.phones import service
from app.phones.page_cache import CataloguePages
from app.query import Page
from tests.helpers import CLUSTER, ONE_NODE, CountingGateway, Shop, other_hosts
from tests.stripe_fixtures import grant

ON_CLUSTER = pytest.mark.parametrize(
    "stack_kind", [pytest.param(CLUSTER, marks=pytest.mark.cluster)], indirect=True
)
ON_BOTH = pytest.mark.parametrize(
    "stack_kind", [ONE_NODE, pytest.param(CLUSTER, marks=pytest.mark.cluster)], indirect=True
)


async def _grant(shop: Shop, redis: Redis, phone_id: str, host: int, units: int) -> None:
    received = await grant(
        redis,
        shop.client.app[appkeys.SCRIPTS],
        phone_id=phone_id,
        host=host,
        units=units,
        price_cents=500,
    )
    assert (received.status, received.flag) == (200, True), received.payload


async def _shown(shop: Shop, phone_id: str) -> int:
    response = await shop.client.get(f"/phones/{phone_id}")
    assert response.status == 200, await response.text()
    return (await response.json())["phone"]["stock"]


async def _listed(shop: Shop) -> dict[str, int]:
    response = await shop.client.get("/phones", params={"per_page": "100"})
    assert response.status == 200, await response.text()
    return {phone["id"]: phone["stock"] for phone in (await response.json())["phones"]}


@ON_CLUSTER
async def test_a_striped_phone_shows_its_pool_and_its_stripes(shop: Shop, redis: Redis) -> None:
    striped = await shop.phone(price_cents=500, stock=200)
    plain = await shop.phone(price_cents=500, stock=7)
    hosts = other_hosts(shop.client.app[appkeys.REDIS_GATEWAY], striped["id"])
    assert len(hosts) == 2
    await _grant(shop, redis, striped["id"], hosts[0], 16)
    await _grant(shop, redis, striped["id"], hosts[1], 24)
    assert await redis.hmget(keys.phone(striped["id"]), "stock", "lent") == [b"160", b"40"]

    assert await _shown(shop, striped["id"]) == 200
    assert await _shown(shop, plain["id"]) == 7
    for _ in range(2):  # the page merged, then from the page cache
        assert await _listed(shop) == {striped["id"]: 200, plain["id"]: 7}

    # Units sold from a stripe leave it (as the stripe order's HINCRBYs do): shown less.
    await redis.hincrby(keys.stripe(hosts[1], striped["id"]), "stock", -5)
    assert await _shown(shop, striped["id"]) == 195
    assert (await _listed(shop))[striped["id"]] == 195


@ON_CLUSTER
async def test_a_stripe_on_a_host_no_primary_hosts_now_is_counted_too(
    shop: Shop, redis: Redis
) -> None:
    """A reshard may leave a stripe on a partition that is no longer its primary's lowest,
    or on the phone's own primary's host (whose orders take the pool): sh{Q}X still names
    it, and it costs one more round trip. The first reads the other primaries' hosts."""
    phone = await shop.phone(price_cents=500, stock=100)
    gateway = shop.client.app[appkeys.REDIS_GATEWAY]
    host = other_hosts(gateway, phone["id"])[0]
    own = gateway.host_partition(partition_of(phone["id"]))
    await _grant(shop, redis, phone["id"], host, 10)
    await _grant(shop, redis, phone["id"], host + 1, 6)  # same primary, not its host
    await _grant(shop, redis, phone["id"], own, 4)
    assert host + 1 not in gateway.host_partitions()
    assert await redis.hget(keys.phone(phone["id"]), "stock") == b"80"

    counting = CountingGateway(gateway)
    shown = await service.get_phone(counting, phone["id"])  # type: ignore[arg-type]
    assert shown.stock == 100
    first, second, third = counting.round_trips
    assert first == ["HGETALL"]
    assert second == ["SMEMBERS"] + ["HGET"] * (len(gateway.host_partitions()) - 1)
    assert third == ["HGET", "HGET"]


@ON_CLUSTER
async def test_a_stripe_with_no_units_left_or_not_yet_received_shows_nothing_more(
    shop: Shop, redis: Redis
) -> None:
    """A stripe emptied by its sales adds 0, and a grant reserved but not received (its
    units held on the pool, not shown, as any reservation's) adds nothing."""
    phone = await shop.phone(price_cents=500, stock=200)
    scripts = shop.client.app[appkeys.SCRIPTS]
    host, other = other_hosts(shop.client.app[appkeys.REDIS_GATEWAY], phone["id"])
    await _grant(shop, redis, phone["id"], host, 16)
    await redis.hincrby(keys.stripe(host, phone["id"]), "stock", -16)  # sold out
    assert await _shown(shop, phone["id"]) == 184
    reserved = await saga.reserve_grant(
        scripts, new_id(other), phone["id"], 8, 10**13, floor=64, shares=2, minimum=8
    )
    assert reserved.status == 200
    assert await _shown(shop, phone["id"]) == 176  # the pool; 8 held by the grant


@ON_BOTH
async def test_a_phone_that_lends_nothing_costs_what_it_did(
    shop: Shop, redis: Redis, stack_kind: str
) -> None:
    """One HGETALL for GET; a remembered catalogue page is one round trip (its clocks and
    rows). A striped row adds one round trip to its page, and one to its GET."""
    plain = await shop.phone(price_cents=500, stock=7)
    gateway = shop.client.app[appkeys.REDIS_GATEWAY]
    counting = CountingGateway(gateway)
    assert (await service.get_phone(counting, plain["id"])).stock == 7  # type: ignore[arg-type]
    assert counting.round_trips == [["HGETALL"]]

    pages = CataloguePages()
    page = Page(page=1, per_page=20)
    await service.list_phones(counting, pages, page)  # type: ignore[arg-type]
    counting.round_trips.clear()
    total, rows = await service.list_phones(counting, pages, page)  # type: ignore[arg-type]
    assert (total, [row.stock for row in rows]) == (1, [7])
    assert counting.round_trips == [["strings", "HGETALL"]]
    if stack_kind == ONE_NODE:
        return

    striped = await shop.phone(price_cents=500, stock=100)
    host = other_hosts(gateway, striped["id"])[0]
    await _grant(shop, redis, striped["id"], host, 10)
    counting.round_trips.clear()
    assert (await service.get_phone(counting, striped["id"])).stock == 100  # type: ignore[arg-type]
    assert [trip[0] for trip in counting.round_trips] == ["HGETALL", "SMEMBERS"]
    await service.list_phones(counting, pages, page)  # type: ignore[arg-type]  # merged anew
    counting.round_trips.clear()
    total, rows = await service.list_phones(counting, pages, page)  # type: ignore[arg-type]
    assert (total, sorted(row.stock for row in rows)) == (2, [7, 100])
    assert [trip[0] for trip in counting.round_trips] == ["strings", "SMEMBERS"]
