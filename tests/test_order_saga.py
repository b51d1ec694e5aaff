"""POST /orders and POST /orders/{id}/cancel by the split reservation saga
(app/orders/saga_service.py, forced by the test-only SAGA_ALWAYS_SPLIT=1: one
redis-server would collapse it) through the real app and one real redis-server: the
answers keep today's codes and precedence, the stock is held, then sold or given back,
one Idempotency-Key gives one order, and the oversell race sells exactly the stock.
The settles run after the answer, so the tests poll for them; nothing sleeps."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from redis.asyncio import Redis

from app import keys, partitions
from app.ops.poll import wait_until_async
from app.orders import saga, saga_service
from app.orders.idempotency import record_place
from app.orders.saga_service import commit_order_keys
from app.problems import ProblemError
from app.redis_gateway import gateway_over
from app.scripts import Scripts
from app.vocabulary import encode_items
from tests.helpers import ADMIN, Shop, without_shedding


@pytest.fixture
def app_env(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    # One redis-server serves every partition, where an order collapses into one script:
    # these are the split saga's own tests (test-only SAGA_ALWAYS_SPLIT).
    monkeypatch.setenv("SAGA_ALWAYS_SPLIT", "1")
    return without_shedding({**app_env, "SAGA_ALWAYS_SPLIT": "1"}, monkeypatch)


async def units(redis: Redis, phone_id: str) -> dict[str, int]:
    row = await redis.hmget(keys.phone(phone_id), "stock", "held", "sold")
    return dict(zip(("stock", "held", "sold"), (int(v or 0) for v in row), strict=True))


async def settled(redis: Redis, *phone_ids: str) -> None:
    """Wait until no unit of these phones is held: every settle after an answer ran."""

    async def nothing_held() -> bool:
        held = [(await units(redis, phone_id))["held"] for phone_id in phone_ids]
        return not any(held)

    await wait_until_async(nothing_held, "the reservations to be settled", 30)


async def test_an_order_debits_and_its_units_end_up_sold(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(price_cents=1500, stock=5)
    other = await shop.phone(price_cents=200, stock=5)
    customer, auth = await shop.customer(balance_cents=10_000)
    response = await shop.order(auth, [(phone["id"], 2), (other["id"], 3)])
    assert response.status == 201, await response.text()
    order = (await response.json())["order"]
    assert order["total_cents"] == 2 * 1500 + 3 * 200
    assert [line["phone_id"] for line in order["items"]] == [phone["id"], other["id"]]
    assert partitions.partition_of(order["id"]) == partitions.partition_of(customer["id"])
    await settled(redis, phone["id"], other["id"])
    assert await units(redis, phone["id"]) == {"stock": 3, "held": 0, "sold": 2}
    assert await units(redis, other["id"]) == {"stock": 2, "held": 0, "sold": 3}
    balance = await redis.hget(keys.customer(customer["id"]), "balance_cents")
    assert int(balance) == 10_000 - 3600


async def test_refusals_keep_todays_codes_and_precedence(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(price_cents=1000, stock=1)
    customer, auth = await shop.customer(balance_cents=500)
    missing = partitions.new_id(7)
    cases = [
        ([(missing, 1), (phone["id"], 5)], auth, {}, 404, "phone_not_found"),
        ([(phone["id"], 2)], auth, {}, 409, "out_of_stock"),
        ([(phone["id"], 1)], auth, {}, 402, "insufficient_funds"),
        ([(missing, 1)], ADMIN, {"customer_id": partitions.new_id(3)}, 404, "customer_not_found"),
    ]
    for lines, headers, extra, status, code in cases:
        response = await shop.order(headers, lines, **extra)
        assert response.status == status, await response.text()
        assert (await response.json())["code"] == code
    await settled(redis, phone["id"])
    # The 402 held the unit until its settle: it is back.
    assert await units(redis, phone["id"]) == {"stock": 1, "held": 0, "sold": 0}
    assert int(await redis.hget(keys.customer(customer["id"]), "balance_cents")) == 500


async def test_one_idempotency_key_gives_one_order(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(price_cents=100, stock=10)
    _, auth = await shop.customer(balance_cents=10_000)
    keyed = {**auth, "Idempotency-Key": "saga-key-1"}
    responses = await asyncio.gather(*(shop.order(keyed, [(phone["id"], 1)]) for _ in range(8)))
    bodies = [await response.json() for response in responses]
    assert {response.status for response in responses} == {201}
    assert len({body["order"]["id"] for body in bodies}) == 1
    replays = [r.headers.get("Idempotent-Replayed") for r in responses]
    assert replays.count(None) == 1
    await settled(redis, phone["id"])
    assert await units(redis, phone["id"]) == {"stock": 9, "held": 0, "sold": 1}


async def test_cancel_refunds_and_gives_the_stock_back(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(price_cents=400, stock=3)
    customer, auth = await shop.customer(balance_cents=1000)
    order = (await (await shop.order(auth, [(phone["id"], 2)], autocheck=False)).json())["order"]
    for _ in range(2):  # cancelled now, then answered as it is
        response = await shop.client.post(f"/orders/{order['id']}/cancel", headers=auth)
        assert response.status == 200
        assert (await response.json())["order"]["status"] == "cancelled"
    await settled(redis, phone["id"])
    assert await units(redis, phone["id"]) == {"stock": 3, "held": 0, "sold": 0}
    assert int(await redis.hget(keys.customer(customer["id"]), "balance_cents")) == 1000
    partition = partitions.partition_of(order["id"])
    assert await redis.zcard(keys.take_backs_due(partition)) == 0


async def test_a_commit_after_the_fence_is_refused(shop: Shop, redis: Redis) -> None:
    """The settler fenced an order whose app was too slow: its commit then answers the
    refusal and writes nothing."""
    phone = await shop.phone(price_cents=100, stock=2)
    customer, _ = await shop.customer(balance_cents=1000)
    scripts = Scripts(gateway_over(redis))
    order_partition = partitions.partition_of(customer["id"])
    order_id = partitions.new_id(order_partition)
    phone_partition = partitions.partition_of(phone["id"])
    # Not expired: the settler of the app would fence it; here the test does, at once.
    expires = int(time.time() * 1000) + 60_000
    reserved = await saga.reserve(scripts, order_id, phone_partition, [(phone["id"], 1)], expires)
    assert await saga.fence(scripts, order_partition, [order_id]) == [saga.ABORTED]
    commit_keys = commit_order_keys(customer["id"], order_id, "open", None, 0)
    items = encode_items([(phone["id"], 1, 100)])
    args = [
        order_id,
        customer["id"],
        1,
        "r",
        "0",
        "0",
        "f",
        60,
        items,
        expires,
        saga.keep_until(),
        0,
    ]
    late = await scripts.call("commit_order", commit_keys, args)
    assert (late.status, late.payload) == (503, {"code": "service_unavailable"})
    assert not await redis.exists(keys.order(order_id))
    assert int(await redis.hget(keys.customer(customer["id"]), "balance_cents")) == 1000
    # The other order of the serialisation: a commit first, then the fence says committed.
    first = partitions.new_id(order_partition)
    committed = await scripts.call(
        "commit_order", [*commit_keys[:2], keys.order(first), *commit_keys[3:]], [first, *args[1:]]
    )
    assert committed.status == 201
    assert await saga.fence(scripts, order_partition, [first]) == [saga.COMMITTED]
    assert reserved.status == 200


async def test_oversell_race_sells_exactly_the_stock(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(price_cents=100, stock=10)
    customers = [await shop.customer(balance_cents=10_000) for _ in range(50)]
    requests = [shop.order(customers[i % 50][1], [(phone["id"], 1)]) for i in range(500)]
    responses = await asyncio.gather(*requests)
    assert Counter(response.status for response in responses) == {201: 10, 409: 490}
    await settled(redis, phone["id"])
    assert await units(redis, phone["id"]) == {"stock": 0, "held": 0, "sold": 10}
    audit = await shop.audit()
    assert audit["ok"] and audit["at_rest"] and audit["orders"]["total"] == 10


async def test_the_audit_is_not_at_rest_while_units_are_held(shop: Shop, redis: Redis) -> None:
    """A reservation outstanding (an app between reserve and commit): the ledgers'
    identities hold, the sold-against-orders equalities wait for rest."""
    phone = await shop.phone(price_cents=100, stock=5)
    await shop.order((await shop.customer())[1], [(phone["id"], 1)])
    await settled(redis, phone["id"])
    assert (await shop.audit())["at_rest"] is True
    scripts = Scripts(gateway_over(redis))
    partition = partitions.partition_of(phone["id"])
    # Not due for a long while: the app's settler leaves it held during the audit.
    later_ms = 10**13
    held = await saga.reserve(
        scripts, partitions.new_id(9), partition, [(phone["id"], 2)], later_ms
    )
    assert held.status == 200
    audit = await shop.audit()
    assert audit["ok"] is True and audit["at_rest"] is False
    checks = {check["name"]: check for check in audit["checks"]}
    assert checks["ledger_balances_plus_orders_equal_added"]["ok"] is True
    assert checks["every_phone_stock_plus_sold_equals_added"]["ok"] is None
    assert "2 units held" in checks["every_phone_stock_plus_sold_equals_added"]["checked"]


async def test_a_reserve_past_the_orders_expiry_answers_503_and_stores_nothing(
    shop: Shop, redis: Redis
) -> None:
    """A request that outlived its own reservation TTL before its reserve reached Redis
    (reserve_stock refuses it by the expiry): a 503 to retry, not a 409, with nothing
    held, stored for the Idempotency-Key or marked."""
    phone = await shop.phone(price_cents=100, stock=2)
    customer, _ = await shop.customer(balance_cents=1000)
    with pytest.raises(ProblemError) as refused:
        await saga_service.place_order(
            Scripts(gateway_over(redis)),
            lambda *settlement: None,
            customer_id=customer["id"],
            lines=[(phone["id"], 1)],
            autocheck=True,
            idempotency_key="late",
            idempotency_ttl=60,
            request_id="r",
            reservation_ttl_ms=-1,  # expired before it is sent
            always_split=True,
        )
    assert (refused.value.status, refused.value.code) == (503, "service_unavailable")
    assert refused.value.headers["Retry-After"] == "1"
    assert await units(redis, phone["id"]) == {"stock": 2, "held": 0, "sold": 0}
    record = record_place(customer["id"], "late", 60, int(time.time()))
    for bucket in (record.newest, *record.older):
        assert not await redis.hexists(bucket, record.field)
    assert not await redis.exists(keys.aborts(partitions.partition_of(customer["id"])))
