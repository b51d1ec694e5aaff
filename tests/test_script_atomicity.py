"""Every script error path leaves every key byte-for-byte unchanged.

Redis never rolls back a half-run script, so each script validates before its
first write; DUMP of the whole database before and after each refused call
proves it (the database holds only this test's keys).
"""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from app import keys
from app.orders.service import cancel_order_keys, check_order_keys
from app.problems import ProblemError
from app.redis_gateway import gateway_over
from app.scripts import Scripts
from tests.helpers import ADMIN, Shop, snapshot


@pytest.fixture
async def world(shop: Shop) -> dict:
    phone = await shop.phone(price_cents=1000, stock=2)
    customer, auth = await shop.customer(balance_cents=5000)
    open_order = await shop.order(auth, [(phone["id"], 1)], autocheck=False)
    completed_order = await shop.order(auth, [(phone["id"], 1)])
    return {
        "phone": phone,
        "customer": customer,
        "auth": auth,
        "open": (await open_order.json())["order"],
        "completed": (await completed_order.json())["order"],
    }


async def test_http_error_paths_change_nothing(shop: Shop, redis: Redis, world: dict) -> None:
    # world: one open and one completed order; then one cancelled, stock 1 left.
    phone, customer, auth = world["phone"], world["customer"], world["auth"]
    await shop.client.post(f"/phones/{phone['id']}/restock", json={"quantity": 1}, headers=ADMIN)
    cancelled = (await (await shop.order(auth, [(phone["id"], 1)], autocheck=False)).json())[
        "order"
    ]
    await shop.client.post(f"/orders/{cancelled['id']}/cancel", headers=auth)
    missing = "AAAAAAAAAAAAAAAAAAAAAA"
    refused_calls = [
        ("POST", "/orders", {"items": [{"phone_id": missing, "quantity": 1}]}, auth, 404),
        ("POST", "/orders", {"items": [{"phone_id": phone["id"], "quantity": 2}]}, auth, 409),
        (
            "POST",
            "/orders",
            {"items": [{"phone_id": phone["id"], "quantity": 1}], "customer_id": missing},
            ADMIN,
            404,
        ),
        ("POST", f"/orders/{cancelled['id']}/check", None, auth, 409),
        ("POST", f"/orders/{world['completed']['id']}/cancel", None, auth, 409),
        ("POST", f"/orders/{missing}/check", None, ADMIN, 404),
        ("POST", f"/orders/{missing}/cancel", None, ADMIN, 404),
        ("POST", f"/phones/{missing}/restock", {"quantity": 1}, ADMIN, 404),
        ("PATCH", f"/phones/{missing}", {"name": "x"}, ADMIN, 404),
        ("POST", f"/customers/{missing}/deposit", {"amount_cents": 1}, ADMIN, 404),
        (
            "POST",
            "/customers",
            {"name": "A", "surname": "B", "email": customer["email"].upper()},
            ADMIN,
            409,
        ),
    ]
    for method, path, body, headers, status in refused_calls:
        before = await snapshot(redis)
        response = await shop.client.request(method, path, json=body, headers=headers)
        assert response.status == status, (path, await response.text())
        assert await snapshot(redis) == before, path


async def test_insufficient_funds_changes_nothing(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(price_cents=1000, stock=5)
    _, auth = await shop.customer(balance_cents=999)
    before = await snapshot(redis)
    response = await shop.order(auth, [(phone["id"], 1)])
    assert response.status == 402
    assert await snapshot(redis) == before


async def test_limit_rejections_change_nothing(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(stock=10**9)
    customer, _ = await shop.customer(balance_cents=10**12)
    scripts = Scripts(gateway_over(redis))
    before = await snapshot(redis)
    with pytest.raises(ProblemError) as stock:
        await scripts.run(
            "restock", [keys.phone(phone["id"]), keys.ledger_of(phone["id"])], [1, 10**9]
        )
    assert stock.value.code == "stock_limit"
    with pytest.raises(ProblemError) as balance:
        await scripts.run(
            "deposit", [keys.customer(customer["id"]), keys.ledger_of(customer["id"])], [1, 10**12]
        )
    assert balance.value.code == "balance_limit"
    assert await snapshot(redis) == before


async def test_idempotency_mismatch_changes_nothing(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(price_cents=10, stock=5)
    _, auth = await shop.customer()
    headers = {**auth, "Idempotency-Key": "abc"}
    first = await shop.client.post(
        "/orders", json={"items": [{"phone_id": phone["id"], "quantity": 1}]}, headers=headers
    )
    assert first.status == 201
    before = await snapshot(redis)
    other = await shop.client.post(
        "/orders", json={"items": [{"phone_id": phone["id"], "quantity": 3}]}, headers=headers
    )
    assert other.status == 422
    assert await snapshot(redis) == before


async def test_scripts_refuse_keys_that_do_not_fit_the_order(shop: Shop, redis: Redis) -> None:
    """check/cancel are given keys built from a read of the order; if those keys
    name another owner or other items, the script refuses before writing."""
    phone = await shop.phone(price_cents=10, stock=5)
    owner, auth = await shop.customer()
    other, _ = await shop.customer()
    order = (await (await shop.order(auth, [(phone["id"], 1)], autocheck=False)).json())["order"]
    scripts = Scripts(gateway_over(redis))
    before = await snapshot(redis)
    with pytest.raises(ProblemError) as wrong_owner:
        await scripts.run(
            "check_order",
            check_order_keys(order["id"], other["id"]),
            [other["id"], "", 0, "req"],
        )
    assert wrong_owner.value.code == "order_owner_changed"
    with pytest.raises(ProblemError) as wrong_items:
        await scripts.run(
            "cancel_order",
            cancel_order_keys(order["id"], owner["id"], [phone["id"]]),
            [owner["id"], "", 0, "req", f"{phone['id']}:5:10"],
        )
    assert wrong_items.value.code == "order_owner_changed"
    assert await snapshot(redis) == before
