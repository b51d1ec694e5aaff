"""The one order path on the real 3+3 Redis Cluster: the saga collapses into one script
(place_order, cancel_order) when one primary serves the customer's partition and every
phone's, and runs split (reserve, commit, settle; refund, give back) when they are on
different primaries; a collapsed script that meets a key its node no longer serves
writes nothing, and the order goes on by the split saga.

Which form ran is read off the app's own per-script call counts
(phoneshop_redis_call_duration_seconds{call="script:<name>"})."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from app import appkeys, keys, partitions
from app.cluster_gateway import ClusterGateway
from app.ops.redis_cluster import LocalCluster
from app.orders.service import place_order_keys
from app.redis_gateway import LuaScript
from app.scripts import load_across_slots_source
from app.vocabulary import COMPLETED, new_order_id
from tests.helpers import ADMIN, CLUSTER, Shop, settled, timed

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.parametrize("stack_kind", [CLUSTER], indirect=True),
]

PLACE_SPLIT = ("script:reserve_stock", "script:commit_order")
FORMS = ("script:place_order", *PLACE_SPLIT, "script:cancel_order", "script:refund_order")


def counts() -> dict[str, float]:
    return {call: timed(call) for call in FORMS}


def moved(before: dict[str, float]) -> dict[str, float]:
    return {call: n - before[call] for call, n in counts().items() if n != before[call]}


def primary_of(view: Any, entity_id: str) -> int:
    return view.primary_for_slot(partitions.slot(partitions.partition_of(entity_id))).port


async def units(redis: Redis, phone_id: str) -> list[int]:
    return [int(v or 0) for v in await redis.hmget(keys.phone(phone_id), "stock", "held", "sold")]


async def customers_with_and_without(
    shop: Shop, view: Any, port: int
) -> tuple[tuple[dict, dict], tuple[dict, dict]]:
    """A customer on the primary ``port`` and one on another (a customer's partition
    comes from its email: new ones until both kinds exist)."""
    here = there = None
    for _ in range(60):
        customer = await shop.customer(balance_cents=100_000)
        if primary_of(view, customer[0]["id"]) == port:
            here = here or customer
        else:
            there = there or customer
        if here and there:
            return here, there
    raise AssertionError("60 customers and no pair of the two kinds")


async def test_one_primary_collapses_the_saga_and_two_split_it(
    redis_cluster: LocalCluster, shop: Shop, redis: Redis
) -> None:
    view = redis_cluster.topology()
    phone = await shop.phone(price_cents=1_000, stock=10)
    (near, near_auth), (far, far_auth) = await customers_with_and_without(
        shop, view, primary_of(view, phone["id"])
    )

    before = counts()
    placed = await shop.order(near_auth, [(phone["id"], 2)], autocheck=False)
    assert placed.status == 201, await placed.text()
    assert moved(before) == {"script:place_order": 1}
    # One script: sold at once, nothing ever held.
    assert await units(redis, phone["id"]) == [8, 0, 2]
    near_order = (await placed.json())["order"]["id"]

    before = counts()
    placed = await shop.order(far_auth, [(phone["id"], 3)], autocheck=False)
    assert placed.status == 201, await placed.text()
    # Nothing sent as one script: the slot map already says two primaries.
    assert moved(before) == dict.fromkeys(PLACE_SPLIT, 1)
    await settled(redis)
    assert await units(redis, phone["id"]) == [5, 0, 5]
    far_order = (await placed.json())["order"]["id"]

    before = counts()
    for order_id in (near_order, far_order):
        response = await shop.client.post(f"/orders/{order_id}/cancel", headers=ADMIN)
        assert response.status == 200, await response.text()
        assert (await response.json())["order"]["status"] == "cancelled"
    assert moved(before) == {"script:cancel_order": 1, "script:refund_order": 1}
    assert await units(redis, phone["id"]) == [10, 0, 0]
    for customer, auth in ((near, near_auth), (far, far_auth)):
        mine = await shop.client.get(f"/customers/{customer['id']}", headers=auth)
        assert (await mine.json())["customer"]["balance_cents"] == 100_000
    audit = await shop.audit_at_rest()
    assert audit["ok"] is True, audit


async def test_a_collapsed_order_a_node_refuses_writes_nothing_and_goes_split(
    redis_cluster: LocalCluster, shop: Shop, redis: Redis
) -> None:
    """A reshard the app's slot map has not seen yet, as the map sees it: the phone's
    partition still listed on the customer's primary, where it is not. That node
    refuses the phone's key before the script's first write; the order is placed by
    the split saga, whose reserve redis-py redirects (MOVED) to the phone's primary."""
    view = redis_cluster.topology()
    phone = await shop.phone(price_cents=1_000, stock=10)
    (_, _), (far, far_auth) = await customers_with_and_without(
        shop, view, primary_of(view, phone["id"])
    )
    gateway = shop.client.app[appkeys.REDIS_GATEWAY]
    assert isinstance(gateway, ClusterGateway)
    cluster: RedisCluster = gateway.cluster
    phone_slot = partitions.slot(partitions.partition_of(phone["id"]))
    customer_node = cluster.get_node_from_key(keys.customer(far["id"]))
    cluster.nodes_manager.slots_cache[phone_slot] = [customer_node]

    before = counts()
    placed = await shop.order(far_auth, [(phone["id"], 4)])
    assert placed.status == 201, await placed.text()
    # The one-script try was sent and refused, then reserve and commit ran.
    assert moved(before) == {"script:place_order": 1, **dict.fromkeys(PLACE_SPLIT, 1)}
    await settled(redis)
    assert await units(redis, phone["id"]) == [6, 0, 4]
    mine = await shop.client.get(f"/customers/{far['id']}", headers=far_auth)
    assert (await mine.json())["customer"]["balance_cents"] == 100_000 - 4_000
    audit = await shop.audit_at_rest()
    assert audit["ok"] is True, audit
    assert audit["orders"]["total"] == 1


async def test_the_node_refuses_an_undeclared_key_it_does_not_serve_before_any_write(
    redis_cluster: LocalCluster, shop: Shop, redis: Redis
) -> None:
    """place_order in its form for several slots of one node, sent to the customer's
    primary with a phone of another: the node's own answer, and every key as it was
    (the customer is read first, and the phone before any write)."""
    view = redis_cluster.topology()
    phone = await shop.phone(price_cents=1_000, stock=10)
    (_, _), (far, _) = await customers_with_and_without(shop, view, primary_of(view, phone["id"]))
    order_id = new_order_id(far["id"], 0)
    script_keys = place_order_keys(far["id"], order_id, COMPLETED, None, [phone["id"]])
    # As the gateway declares them (ClusterGateway): the leading keys of the first key's
    # slot, the customer's; the rest (the phone's, then the customer's Idempotency-Key
    # buckets) come undeclared.
    assert isinstance(redis, RedisCluster)
    slot = redis.keyslot(script_keys[0])
    count = next(
        (i for i, key in enumerate(script_keys) if redis.keyslot(key) != slot), len(script_keys)
    )
    declared, undeclared = script_keys[:count], script_keys[count:]
    assert any(redis.keyslot(key) != slot for key in undeclared), "a phone of another slot"
    across = LuaScript.of("place_order", load_across_slots_source("place_order"))
    node = redis.get_node_from_key(keys.customer(far["id"]))
    before = {key: await redis.dump(key) for key in script_keys}
    with pytest.raises(ResponseError, match="non local key"):
        await redis.execute_command(
            "EVAL",
            across.source,
            len(declared),
            *declared,
            len(undeclared),
            *undeclared,
            order_id,
            far["id"],
            1,
            "r",
            "1",
            "0",
            "f",
            60,
            phone["id"],
            1,
            target_nodes=node,
        )
    assert {key: await redis.dump(key) for key in script_keys} == before
