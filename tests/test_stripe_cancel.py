"""The cancel of an order sold from stripes (docs/escrow.md, section 6), on the session's
3+3 cluster: the customer's primary hosts a stripe of a phone that lives on another
primary (made by the real receipt, tests/stripe_fixtures.py), and the order is placed
through the API from that stripe (place_from_stripe.lua), its hash marked ``v = S:epoch``.

* collapsed (the customer's partition and the host on one primary): one cancel_order in
  its stripe form gives the units back to the stripe, the pool untouched;
* split (``always_split``: what a reshard of the host leaves): refund_order, then
  return_to_stripe on the host, idempotent by ``rr{S}``;
* the stripe closed since (a recall): the units go back to the pool, from the ``sold`` its
  shipment brought home;
* an app dead after the refund: the settler's sweep of ``ro{P}`` gives them back.
After each, the audit holds at rest."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from app import appkeys, keys
from app.auth import ADMIN as ADMIN_PRINCIPAL
from app.fields import BALANCE_LIMIT, STOCK_LIMIT
from app.orders import recall, saga_service, stripe_cancel
from app.orders.saga_service import refund_order_keys
from app.partitions import chunk_of, partition_of
from app.vocabulary import ORDER_FIELDS, encode_items, stripe_mark
from tests.helpers import CLUSTER, Shop, customer_apart_from, timed
from tests.stripe_fixtures import grant

pytestmark = pytest.mark.parametrize(
    "stack_kind", [pytest.param(CLUSTER, marks=pytest.mark.cluster)], indirect=True
)

PRICE = 500


async def _int_fields(redis: Redis, key: str, *fields: str) -> list[int]:
    return [int(v or 0) for v in await redis.hmget(key, *fields)]


async def _stripe_sale(shop: Shop, redis: Redis) -> dict:
    """A phone of 200 units on one primary; a customer on another, whose primary's host
    holds a stripe of 16 of them; an order of 3 sold from that stripe."""
    gateway = shop.client.app[appkeys.REDIS_GATEWAY]
    phone = await shop.phone(price_cents=PRICE, stock=200)
    customer, auth, host = await customer_apart_from(shop, gateway, phone["id"])
    received = await grant(
        redis,
        shop.client.app[appkeys.SCRIPTS],
        phone_id=phone["id"],
        host=host,
        units=16,
        price_cents=PRICE,
    )
    assert (received.status, received.flag) == (200, True), received.payload
    response = await shop.order(auth, [(phone["id"], 3)], autocheck=False)
    assert response.status == 201, await response.text()
    order = (await response.json())["order"]
    stripe = keys.stripe(host, phone["id"])
    assert (
        await redis.hget(keys.order(order["id"]), ORDER_FIELDS["stripe"])
        == stripe_mark(host, 0).encode()
    )
    assert await _int_fields(redis, stripe, "stock", "sold") == [13, 3]
    return {
        "phone": phone["id"],
        "customer": customer["id"],
        "auth": auth,
        "host": host,
        "order": order["id"],
        "stripe": stripe,
    }


async def _balance(redis: Redis, customer_id: str) -> int:
    return int(await redis.hget(keys.customer(customer_id), "balance_cents"))


async def _cancelled(shop: Shop, sale: dict) -> dict:
    response = await shop.client.post(f"/orders/{sale['order']}/cancel", headers=sale["auth"])
    assert response.status == 200, await response.text()
    return (await response.json())["order"]


async def test_a_collapsed_cancel_gives_the_units_back_to_the_stripe(
    shop: Shop, redis: Redis
) -> None:
    sale = await _stripe_sale(shop, redis)
    assert await _balance(redis, sale["customer"]) == 100_000 - 3 * PRICE
    scripts = ("script:cancel_order", "script:refund_order", "script:return_to_stripe")
    before = [timed(label) for label in scripts]
    assert (await _cancelled(shop, sale))["status"] == "cancelled"
    assert [timed(label) - b for label, b in zip(scripts, before, strict=True)] == [1, 0, 0]
    assert await _int_fields(redis, sale["stripe"], "stock", "sold", "got") == [16, 0, 16]
    assert await _int_fields(redis, keys.phone(sale["phone"]), "stock", "sold", "lent") == [
        184,
        0,
        16,
    ]
    assert await _balance(redis, sale["customer"]) == 100_000
    assert await _int_fields(
        redis, keys.ledger(sale["host"]), "stripe_units", "stripe_sold_units"
    ) == [16, 0]
    # Again: answered as it is, nothing moves.
    assert (await _cancelled(shop, sale))["status"] == "cancelled"
    assert await _int_fields(redis, sale["stripe"], "stock", "sold") == [16, 0]
    audit = await shop.audit_at_rest()
    assert audit["ok"] is True, audit["checks"]


async def test_a_split_cancel_gives_them_back_once_by_the_hosts_take_back_set(
    shop: Shop, redis: Redis
) -> None:
    sale = await _stripe_sale(shop, redis)
    app = shop.client.app
    order = await saga_service.cancel_order(
        app[appkeys.REDIS_GATEWAY],
        app[appkeys.SCRIPTS],
        ADMIN_PRINCIPAL,
        sale["order"],
        "req",
        take_back_after_ms=60_000,
        always_split=True,
    )
    assert order.status == "cancelled"
    assert await _int_fields(redis, sale["stripe"], "stock", "sold") == [16, 0]
    assert await redis.sismember(keys.taken_back(sale["host"]), sale["order"])
    assert await redis.zcard(keys.take_backs_due(partition_of(sale["order"]))) == 0
    assert await _balance(redis, sale["customer"]) == 100_000
    # A second give-back (a settler that found the entry still due) moves nothing.
    again = await app[appkeys.SCRIPTS].call(
        "return_to_stripe",
        [keys.taken_back(sale["host"]), keys.ledger(sale["host"]), sale["stripe"]],
        [sale["order"], 0, encode_items([(sale["phone"], 3, PRICE)]), STOCK_LIMIT],
    )
    assert (again.status, again.payload, again.flag) == (200, {"returned": "0"}, False)
    assert await _int_fields(redis, sale["stripe"], "stock", "sold") == [16, 0]
    audit = await shop.audit_at_rest()
    assert audit["ok"] is True, audit["checks"]


async def test_after_a_recall_the_units_go_back_to_the_pool(shop: Shop, redis: Redis) -> None:
    sale = await _stripe_sale(shop, redis)
    recalled = await recall.recall(shop.client.app[appkeys.SCRIPTS], sale["phone"])
    assert recalled.done
    # The stripe's 13 units and its 3 sold went home: the pool has them.
    assert await _int_fields(redis, keys.phone(sale["phone"]), "stock", "sold", "lent") == [
        197,
        3,
        0,
    ]
    assert (await _cancelled(shop, sale))["status"] == "cancelled"
    assert await _int_fields(redis, keys.phone(sale["phone"]), "stock", "sold", "lent") == [
        200,
        0,
        0,
    ]
    assert await _int_fields(redis, sale["stripe"], "stock", "sold") == [0, 0]
    assert await redis.sismember(keys.taken_back(partition_of(sale["phone"])), sale["order"])
    assert await _balance(redis, sale["customer"]) == 100_000
    audit = await shop.audit_at_rest()
    assert audit["ok"] is True, audit["checks"]


async def test_the_settler_gives_back_what_a_dead_apps_cancel_refunded(
    shop: Shop, redis: Redis
) -> None:
    """refund_order ran (the order cancelled, the money back, the order due on ro{P}),
    then the app died: the settler's sweep gives the units back to the stripe."""
    sale = await _stripe_sale(shop, redis)
    app = shop.client.app
    order_id, partition = sale["order"], partition_of(sale["order"])
    due = 2_000_000_000_000  # not due for the app's own settler
    await app[appkeys.SCRIPTS].run(
        "refund_order",
        refund_order_keys(order_id, sale["customer"], chunk_of(order_id)),
        [sale["customer"], "", 0, "req", BALANCE_LIMIT, due, chunk_of(order_id)],
    )
    assert await redis.zscore(keys.take_backs_due(partition), order_id) == due
    assert await _int_fields(redis, sale["stripe"], "stock", "sold") == [13, 3]
    settler = app[appkeys.SETTLER]
    assert await settler.sweep(now_ms=due) >= 1
    assert await _int_fields(redis, sale["stripe"], "stock", "sold") == [16, 0]
    assert await redis.zcard(keys.take_backs_due(partition)) == 0
    assert await _balance(redis, sale["customer"]) == 100_000
    audit = await shop.audit_at_rest()
    assert audit["ok"] is True, audit["checks"]


async def _contents(redis: Redis, names: list[str]) -> list:
    out = []
    for name in names:
        kind = (await redis.type(name)).decode()
        if kind == "hash":
            out.append(sorted((await redis.hgetall(name)).items()))
        elif kind == "set":
            out.append(sorted(await redis.smembers(name)))
        elif kind == "zset":
            out.append(await redis.zrange(name, 0, -1, withscores=True))
        elif kind == "stream":
            out.append(await redis.xlen(name))
        else:
            out.append((kind, await redis.get(name) if kind == "string" else None))
    return out


async def test_a_closed_stripes_refusals_write_nothing(shop: Shop, redis: Redis) -> None:
    """After a recall the stripe is at the next epoch: the stripe form of cancel_order and
    return_to_stripe both answer stripe_closed, and every key either could touch is as
    it was."""
    sale = await _stripe_sale(shop, redis)
    app = shop.client.app
    scripts = app[appkeys.SCRIPTS]
    assert (await recall.recall(scripts, sale["phone"])).done
    order_id, host = sale["order"], sale["host"]
    partition = partition_of(order_id)
    names = [
        keys.order(order_id),
        keys.customer(sale["customer"]),
        keys.ledger(partition),
        keys.events(partition),
        keys.take_backs_due(partition),
        sale["stripe"],
        keys.ledger(host),
        keys.taken_back(host),
        keys.phone(sale["phone"]),
        keys.ledger(partition_of(sale["phone"])),
    ]
    before = await _contents(redis, names)
    items = encode_items([(sale["phone"], 3, PRICE)])
    mark = stripe_mark(host, 0)
    refused = await stripe_cancel.cancel_on_one_node(
        scripts, ADMIN_PRINCIPAL, order_id, sale["customer"], items, mark, "req", 0
    )
    assert refused is None
    answer = await scripts.call(
        "return_to_stripe",
        stripe_cancel.return_to_stripe_keys(host, items),
        [order_id, 0, items, STOCK_LIMIT],
    )
    assert (answer.status, answer.payload) == (
        307,
        {"code": "stripe_closed", "phone_id": sale["phone"]},
    )
    assert await _contents(redis, names) == before
