"""Escrow's grants end to end on the real 3+3 cluster (docs/escrow.md, section 4): the
striping rule behind ESCROW_STRIPES (off: HOT_RESERVES apart orders of a deep phone change
nothing; on, the default: its reserves set it striped and the worker's refiller grants a stripe
to each other primary's host, received and settled held -> lent, units conserved at rest);
and the refiller's gather: one grant per (host, phone) however often it was wanted."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app import keys, partitions
from app.main import create_app
from app.ops.poll import wait_until_async
from app.ops.redis_cluster import LocalCluster
from app.orders import grants
from app.orders import saga as steps
from app.orders.settler import Settler
from app.orders.stripes import STRIPE_ANSWERS, StripeAnswer
from app.settings import Settings
from app.vocabulary import STRIPED
from tests.grant_fixtures import REST_S, customer_email, host_by_port, phone_at_rest, port_of
from tests.helpers import ADMIN, ADMIN_TOKEN, CLUSTER, Shop
from tests.saga_fixtures import PHONE_PARTITION, SagaWorld


def test_escrow_stripes_is_on_unless_the_setting_says_so() -> None:
    assert Settings.from_env({"ADMIN_TOKEN": ADMIN_TOKEN}).escrow_stripes is True
    off = Settings.from_env({"ADMIN_TOKEN": ADMIN_TOKEN, "ESCROW_STRIPES": "0"})
    assert off.escrow_stripes is False


def test_grant_size_is_a_power_of_two_between_the_bounds() -> None:
    assert [grants.grant_size(d) for d in (0, 1, 8, 9, 16, 17, 200, 256, 10**6)] == [
        8,
        8,
        8,
        16,
        16,
        32,
        256,
        256,
        256,
    ]


async def test_hot_reserves_apart_stripe_a_deep_phone_and_no_fewer(saga: SagaWorld) -> None:
    deep = await saga.phone(PHONE_PARTITION, price_cents=100, stock=1000)
    # Left with one unit under STRIPE_MIN by the reserve that makes it hot.
    shallow_stock = grants.STRIPE_MIN + grants.HOT_RESERVES - 1
    shallow = await saga.phone(PHONE_PARTITION, price_cents=100, stock=shallow_stock)

    async def reserve(phone: str, rule: str = grants.STRIPING_RULE) -> dict[str, Any]:
        order = partitions.new_id(partitions.PARTITIONS - 1)
        result = await steps.reserve(
            saga.scripts, order, PHONE_PARTITION, [(phone, 1)], 10**13, striping_rule=rule
        )
        assert result.status == 200
        return result.payload

    # Without the rule (ESCROW_STRIPES off), reserves count nothing.
    for _ in range(grants.HOT_RESERVES):
        assert "striped" not in await reserve(deep, rule="")
    assert await saga.redis.hmget(keys.phone(deep), "mode", "apart") == [None, None]
    answers = [await reserve(deep) for _ in range(grants.HOT_RESERVES + 2)]
    assert ["striped" in answer for answer in answers].count(True) == 1
    assert answers[grants.HOT_RESERVES - 1]["striped"] == [deep]
    assert await saga.redis.hget(keys.phone(deep), "mode") == STRIPED
    # Hot but not deep: STRIPE_MIN - 1 left when it turns hot.
    for _ in range(grants.HOT_RESERVES + 2):
        assert "striped" not in await reserve(shallow)
    assert await saga.redis.hget(keys.phone(shallow), "mode") is None


# ---- the refiller on the cluster -----------------------------------------------------------


async def test_a_gather_sends_one_grant_per_host_and_phone(saga: SagaWorld) -> None:
    if saga.backend == "single":
        pytest.skip("one redis-server has no other primary to lend to")
    phone = await saga.phone(PHONE_PARTITION, price_cents=900, stock=10_000)
    await saga.redis.hset(keys.phone(phone), "mode", STRIPED)
    # The gateway's slot map is learnt at its first call (the app's first request).
    await saga.gateway.hgetall(keys.phone(phone))
    hosts = saga.gateway.host_partitions()
    assert len(hosts) == 3
    own = saga.gateway.host_partition(PHONE_PARTITION)
    first, second = [host for host in hosts if host != own]
    settler = Settler(saga.gateway, saga.scripts)
    refiller = grants.Refiller(
        saga.gateway, saga.scripts, settler.settle_soon, reservation_ttl_ms=10_000
    )
    # Low water met by many orders of one worker within one gather.
    for demand in (3, 20, 5, 9, 1, 20, 2, 4, 6, 7):
        refiller.want(first, phone, demand)
    for _ in range(3):
        refiller.want(second, phone)
    await refiller.drain()
    await settler.drain()
    sent = list(refiller.granted)
    assert sorted((partitions.partition_of(g.grant_id), g.units) for g in sent) == sorted(
        [(first, 32), (second, 8)]
    )
    assert {g.outcome for g in sent} == {steps.COMMITTED}
    # Each stripe got its grant once, and the pool lent exactly that.
    for host, units in ((first, 32), (second, 8)):
        assert await saga.redis.hmget(keys.stripe(host, phone), "stock", "got") == [
            str(units),
            str(units),
        ]
    row = await saga.redis.hmget(keys.phone(phone), "stock", "held", "lent")
    assert row == [str(10_000 - 40), "0", "40"]
    assert await saga.redis.smembers(keys.grants_in_flight(phone)) == set()
    assert await saga.redis.smembers(keys.stripe_hosts(phone)) == {str(first), str(second)}
    # The next gather sends again (one per gather, not one for ever).
    refiller.want(first, phone, 8)
    await refiller.drain()
    await settler.drain()
    assert len(refiller.granted) == 3
    assert await saga.redis.hget(keys.phone(phone), "lent") == "48"


async def test_stripe_orders_short_or_below_low_water_want_one_grant_per_gather(
    saga: SagaWorld,
) -> None:
    """The stripe order's hook (STRIPE_ANSWERS): each line's answer counts as demand;
    short or below a quarter of the grant that demand makes, a refill is wanted, and
    the gather sends one grant per (host, phone) however many orders wanted it."""
    if saga.backend == "single":
        pytest.skip("one redis-server has no other primary to lend to")
    phone = await saga.phone(PHONE_PARTITION, price_cents=900, stock=10_000)
    full = await saga.phone(PHONE_PARTITION, price_cents=900, stock=10_000)
    for striped in (phone, full):
        await saga.redis.hset(keys.phone(striped), "mode", STRIPED)
    await saga.gateway.hgetall(keys.phone(phone))  # the slot map
    own = saga.gateway.host_partition(PHONE_PARTITION)
    first, second = [host for host in saga.gateway.host_partitions() if host != own]
    settler = Settler(saga.gateway, saga.scripts)
    refiller = grants.Refiller(
        saga.gateway, saga.scripts, settler.settle_soon, reservation_ttl_ms=10_000
    )
    stop = STRIPE_ANSWERS.listen(refiller.heard)
    try:
        STRIPE_ANSWERS.tell([StripeAnswer(first, phone, left) for left in range(10, 0, -1)])
        STRIPE_ANSWERS.tell([StripeAnswer(second, phone, None) for _ in range(5)])
        # Well above its low water: nothing wanted.
        STRIPE_ANSWERS.tell([StripeAnswer(first, full, 100) for _ in range(10)])
        await refiller.drain()
        await settler.drain()
    finally:
        stop()
    # 10 orders heard: k = 16, low water 4 (the last 3 answers were below it); 5: k = 8.
    sent = sorted((partitions.partition_of(g.grant_id), g.units) for g in refiller.granted)
    assert sent == sorted([(first, 16), (second, 8)])
    assert await saga.redis.hget(keys.phone(phone), "lent") == "24"
    assert await saga.redis.hget(keys.phone(full), "lent") is None


# ---- the striping rule through the API ------------------------------------------------------


async def _apart_customers(
    client: TestClient, cluster: LocalCluster, phone_id: str, count: int
) -> list[tuple[str, dict[str, str]]]:
    """``count`` customers on other primaries than the phone's: (id, auth header)."""
    view = cluster.topology()
    phone_port = port_of(view, partitions.partition_of(phone_id))
    hosts = set(host_by_port(cluster).values())
    auths = []
    for _ in range(count):
        response = await client.post(
            "/customers",
            json={
                "name": "A",
                "surname": "B",
                "email": customer_email(cluster, phone_port, hosts),
                "balance_cents": 10**9,
            },
            headers=ADMIN,
        )
        assert response.status == 201, await response.text()
        body = await response.json()
        auths.append((body["customer"]["id"], {"Authorization": f"Bearer {body['token']}"}))
    return auths


@pytest.mark.cluster
@pytest.mark.parametrize("stack_kind", [CLUSTER], indirect=True)
@pytest.mark.parametrize("escrow", ["", "0"])
async def test_the_striping_rule_is_on_by_default_and_grants_every_other_primary(
    aiohttp_client: Any,
    app_env: dict[str, str],
    redis: Redis,
    redis_cluster: LocalCluster,
    monkeypatch: pytest.MonkeyPatch,
    escrow: str,
) -> None:
    if escrow:
        monkeypatch.setenv("ESCROW_STRIPES", escrow)
    client: TestClient = await aiohttp_client(await create_app())
    shop = Shop(client)
    phone = await shop.phone(price_cents=500, stock=1000)
    customers = await _apart_customers(client, redis_cluster, phone["id"], 2)
    auths = [auth for _, auth in customers]
    for n in range(grants.HOT_RESERVES):
        response = await shop.order(auths[n % 2], [(phone["id"], 1)])
        assert response.status == 201, await response.text()
    by_port = host_by_port(redis_cluster)
    hosts = sorted(by_port.values())
    found = await phone_at_rest(redis, phone["id"], hosts)
    mode = await redis.hget(keys.phone(phone["id"]), "mode")
    if escrow == "0":
        assert mode is None
        hot = grants.HOT_RESERVES
        assert found == {"stock": 1000 - hot, "sold": hot, "lent": 0, "added": 1000, "got": 0}
        assert not await redis.exists(keys.stripe_hosts(phone["id"]))
        return
    assert mode == STRIPED.encode()
    own = by_port[port_of(redis_cluster.topology(), partitions.partition_of(phone["id"]))]
    others = [host for host in hosts if host != own]

    async def granted() -> dict[str, int] | None:
        got = [await redis.hget(keys.stripe(host, phone["id"]), "got") for host in others]
        return None if None in got else await phone_at_rest(redis, phone["id"], hosts)

    found = await wait_until_async(granted, "a stripe on every other primary", REST_S)
    # One grant for HOT_RESERVES orders to each other primary's host: 2 on 3 primaries.
    sold, lent = grants.HOT_RESERVES, 2 * grants.grant_size(grants.HOT_RESERVES)
    assert found == {"stock": 1000 - sold - lent, "sold": sold, "lent": lent, "added": 1000,
                     "got": lent}  # fmt: skip
    members = await redis.smembers(keys.stripe_hosts(phone["id"]))
    assert {int(m) for m in members} == set(others)
    assert not await redis.exists(keys.grants_in_flight(phone["id"]))
    audit = await shop.audit_at_rest()
    assert audit["ok"], audit


@pytest.mark.cluster
@pytest.mark.parametrize("stack_kind", [CLUSTER], indirect=True)
async def test_a_striped_phone_sells_from_its_stripe_and_refills_it_on_low_water(
    aiohttp_client: Any,
    app_env: dict[str, str],
    redis: Redis,
    redis_cluster: LocalCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The whole loop through the API: HOT_RESERVES apart orders stripe the phone and grant
    its first stripes; then one customer's orders sell from the stripe on its primary's
    host (place_from_stripe), whose answers below low water refill it (the refiller's
    hook), so that it sells on past its first grant; at rest units are conserved and the
    audit passes."""
    monkeypatch.setenv("ESCROW_STRIPES", "1")
    client: TestClient = await aiohttp_client(await create_app())
    shop = Shop(client)
    phone = await shop.phone(price_cents=500, stock=1000)
    customers = await _apart_customers(client, redis_cluster, phone["id"], 2)
    auths = [auth for _, auth in customers]
    for n in range(grants.HOT_RESERVES):
        response = await shop.order(auths[n % 2], [(phone["id"], 1)])
        assert response.status == 201, await response.text()
    by_port = host_by_port(redis_cluster)
    hosts = sorted(by_port.values())
    view = redis_cluster.topology()
    host = by_port[port_of(view, partitions.partition_of(customers[0][0]))]

    async def first_stripe() -> str | None:
        return await redis.hget(keys.stripe(host, phone["id"]), "got")

    await wait_until_async(first_stripe, "the first stripe on the customer's host", REST_S)
    more = 40  # past the first grant's units (grant_size(HOT_RESERVES))
    for _ in range(more):
        response = await shop.order(auths[0], [(phone["id"], 1)])
        assert response.status == 201, await response.text()
    found = await phone_at_rest(redis, phone["id"], hosts)
    stripe_sold = int(await redis.hget(keys.stripe(host, phone["id"]), "sold"))
    receipts = await redis.hlen(keys.grant_receipts(host))
    # Orders were sold from the stripe, more than its first grant held: it was refilled.
    assert stripe_sold > grants.HOT_RESERVES
    assert receipts >= 2
    # Every unit of the HOT_RESERVES + 40 orders sold once: by the pool (the saga) or by a stripe.
    others_sold = 0
    for other in hosts:
        if other != host:
            others_sold += int(await redis.hget(keys.stripe(other, phone["id"]), "sold") or 0)
    assert found["sold"] + stripe_sold + others_sold == grants.HOT_RESERVES + more
    audit = await shop.audit_at_rest()
    assert audit["ok"], audit
