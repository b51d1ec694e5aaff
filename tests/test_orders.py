"""Orders: place, check, cancel, list, the seed aliases and who may see what."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from app import keys
from app.fields import BALANCE_LIMIT, STOCK_LIMIT
from app.partitions import chunk_of, new_id, partition_of
from tests.helpers import ADMIN, ON_BOTH_STACKS, Shop, all_events, orders_stored, snapshot

# On one redis-server and on the 3+3 Redis Cluster (`-m cluster`: the cluster runs).
pytestmark = ON_BOTH_STACKS


def problem_of(body: dict) -> str:
    return body["code"]


def routes_of_one_order(order_id: str) -> tuple[tuple[str, str], ...]:
    """Every route that names one order: method and path."""
    return (
        ("GET", f"/orders/{order_id}"),
        ("POST", f"/orders/{order_id}/check"),
        ("POST", f"/orders/{order_id}/cancel"),
        ("POST", f"/orders/check/{order_id}"),
    )


async def test_place_order_autochecks_debits_and_decrements(shop: Shop, redis: Redis) -> None:
    a = await shop.phone(price_cents=1000, stock=5)
    b = await shop.phone(price_cents=250, stock=5)
    customer, auth = await shop.customer(balance_cents=10_000)
    response = await shop.order(auth, [(a["id"], 2), (b["id"], 3)])
    assert response.status == 201
    order = (await response.json())["order"]
    assert order["status"] == "completed"
    assert order["customer_id"] == customer["id"]
    assert order["total_cents"] == 2750
    assert order["items"] == [
        {"phone_id": a["id"], "quantity": 2, "unit_price_cents": 1000, "line_total_cents": 2000},
        {"phone_id": b["id"], "quantity": 3, "unit_price_cents": 250, "line_total_cents": 750},
    ]
    assert response.headers["Location"] == f"/orders/{order['id']}"
    assert await redis.hget(keys.customer(customer["id"]), "balance_cents") == b"7250"
    assert await redis.hget(keys.phone(a["id"]), "stock") == b"3"
    assert await redis.hget(keys.phone(b["id"]), "stock") == b"2"
    events = await all_events(redis)
    assert [fields[b"type"] for _, fields in events] == [b"order.placed", b"order.completed"]
    assert events[1][1][b"balance_cents"] == b"7250"
    assert {fields[b"order_id"] for _, fields in events} == {order["id"].encode()}
    assert events[0][1][b"request_id"] == response.headers["X-Request-ID"].encode()
    assert (await shop.audit())["ok"]


async def test_order_keeps_the_price_it_was_placed_at(shop: Shop) -> None:
    phone = await shop.phone(price_cents=1000, stock=5)
    _, auth = await shop.customer()
    order = (await (await shop.order(auth, [(phone["id"], 1)], autocheck=False)).json())["order"]
    await shop.client.patch(f"/phones/{phone['id']}", json={"price_cents": 5}, headers=ADMIN)
    fetched = await (await shop.client.get(f"/orders/{order['id']}", headers=auth)).json()
    assert fetched["order"]["items"][0]["unit_price_cents"] == 1000
    cancelled = await shop.client.post(f"/orders/{order['id']}/cancel", headers=auth)
    assert (await cancelled.json())["order"]["total_cents"] == 1000
    assert (await shop.audit())["ok"]


async def test_open_order_then_check(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(stock=2)
    _, auth = await shop.customer()
    order = (await (await shop.order(auth, [(phone["id"], 1)], autocheck=False)).json())["order"]
    assert order["status"] == "open"
    assert [f[b"type"] for _, f in await all_events(redis)] == [b"order.placed"]
    checked = await shop.client.post(f"/orders/{order['id']}/check", headers=auth)
    assert checked.status == 200
    assert (await checked.json())["order"]["status"] == "completed"
    again = await shop.client.post(f"/orders/{order['id']}/check", headers=auth)
    assert again.status == 200
    assert (await again.json())["order"] == (await checked.json())["order"]
    # Checking twice appends one event, not two.
    events = await all_events(redis)
    assert [f[b"type"] for _, f in events] == [b"order.placed", b"order.completed"]
    # The completion carries the balance of that moment, for the mail.
    assert events[1][1][b"balance_cents"] == str(1_000_000 - 10_000).encode()
    cancel = await shop.client.post(f"/orders/{order['id']}/cancel", headers=auth)
    assert cancel.status == 409
    assert problem_of(await cancel.json(content_type=None)) == "order_completed"


async def test_cancel_refunds_and_restocks(shop: Shop, redis: Redis) -> None:
    a = await shop.phone(price_cents=300, stock=4)
    b = await shop.phone(price_cents=700, stock=4)
    customer, auth = await shop.customer(balance_cents=5000)
    order = (await (await shop.order(auth, [(a["id"], 2), (b["id"], 1)], autocheck=False)).json())[
        "order"
    ]
    assert await redis.hget(keys.customer(customer["id"]), "balance_cents") == b"3700"
    cancelled = await shop.client.post(f"/orders/{order['id']}/cancel", headers=auth)
    assert cancelled.status == 200
    assert (await cancelled.json())["order"]["status"] == "cancelled"
    assert await redis.hget(keys.customer(customer["id"]), "balance_cents") == b"5000"
    assert await redis.hget(keys.phone(a["id"]), "stock") == b"4"
    assert await redis.hget(keys.phone(b["id"]), "stock") == b"4"
    again = await shop.client.post(f"/orders/{order['id']}/cancel", headers=auth)
    assert again.status == 200
    assert await redis.hget(keys.customer(customer["id"]), "balance_cents") == b"5000"
    types = [f[b"type"] for _, f in await all_events(redis)]
    assert types == [b"order.placed", b"order.cancelled"]
    check = await shop.client.post(f"/orders/{order['id']}/check", headers=auth)
    assert check.status == 409
    assert problem_of(await check.json(content_type=None)) == "order_cancelled"
    assert (await shop.audit())["ok"]


async def test_rejections_name_what_is_wrong(shop: Shop) -> None:
    phone = await shop.phone(price_cents=1000, stock=1)
    _, auth = await shop.customer(balance_cents=1500)
    missing = "AAAAAAAAAAAAAAAAAAAAAA"
    not_found = await shop.order(auth, [(phone["id"], 1), (missing, 1)])
    assert not_found.status == 404
    body = await not_found.json(content_type="application/problem+json")
    assert body["code"] == "phone_not_found" and body["phone_ids"] == [missing]
    short = await shop.order(auth, [(phone["id"], 2)])
    assert short.status == 409
    body = await short.json(content_type="application/problem+json")
    assert body["code"] == "out_of_stock"
    assert body["lines"] == [{"phone_id": phone["id"], "requested": 2, "available": 1}]
    await shop.client.post(f"/phones/{phone['id']}/restock", json={"quantity": 5}, headers=ADMIN)
    poor = await shop.order(auth, [(phone["id"], 2)])
    assert poor.status == 402
    body = await poor.json(content_type="application/problem+json")
    assert (body["code"], body["balance_cents"], body["total_cents"]) == (
        "insufficient_funds",
        1500,
        2000,
    )
    for field in ("type", "title", "status", "detail", "code"):
        assert field in body
    assert (await shop.audit())["orders"]["total"] == 0


async def test_multi_line_order_is_all_or_nothing(shop: Shop, redis: Redis) -> None:
    plenty = await shop.phone(price_cents=100, stock=50)
    scarce = await shop.phone(price_cents=100, stock=1)
    customer, auth = await shop.customer(balance_cents=10_000)
    response = await shop.order(auth, [(plenty["id"], 10), (scarce["id"], 2)])
    assert response.status == 409
    assert await redis.hget(keys.phone(plenty["id"]), "stock") == b"50"
    assert await redis.hget(keys.phone(scarce["id"]), "stock") == b"1"
    assert await redis.hget(keys.customer(customer["id"]), "balance_cents") == b"10000"
    assert not await all_events(redis) and await orders_stored(redis) == 0


async def test_seed_aliases(shop: Shop) -> None:
    phone = await shop.phone(price_cents=100, stock=10)
    customer, auth = await shop.customer()
    created = await shop.client.post(
        "/orders/create",
        json={"phones": [phone["id"], phone["id"], phone["id"]], "autocheck": False},
        headers=auth,
    )
    assert created.status == 201
    order = (await created.json())["order"]
    assert order["items"][0]["quantity"] == 3 and order["total_cents"] == 300
    checked = await shop.client.post(f"/orders/check/{order['id']}", headers=auth)
    assert (await checked.json())["order"]["status"] == "completed"
    second = (await (await shop.order(auth, [(phone["id"], 1)], autocheck=False)).json())["order"]
    readme = await shop.client.post(f"/phones/check/{second['id']}", headers=auth)
    assert (await readme.json())["order"]["status"] == "completed"
    by_admin = await shop.client.post(
        "/orders/create",
        json={"customer": customer["id"], "phones": [phone["id"]]},
        headers=ADMIN,
    )
    assert by_admin.status == 201
    assert (await by_admin.json())["order"]["customer_id"] == customer["id"]


async def test_admin_orders_on_behalf_and_customers_cannot(shop: Shop) -> None:
    phone = await shop.phone()
    alice, alice_auth = await shop.customer()
    bob, _ = await shop.customer()
    no_customer = await shop.order(ADMIN, [(phone["id"], 1)])
    assert no_customer.status == 422
    for_alice = await shop.order(ADMIN, [(phone["id"], 1)], customer_id=alice["id"])
    assert (await for_alice.json())["order"]["customer_id"] == alice["id"]
    for_bob = await shop.order(alice_auth, [(phone["id"], 1)], customer_id=bob["id"])
    assert for_bob.status == 403
    unknown = await shop.order(ADMIN, [(phone["id"], 1)], customer_id="AAAAAAAAAAAAAAAAAAAAAA")
    assert unknown.status == 404
    assert (await shop.audit())["orders"]["total"] == 1


async def test_bola_other_customers_orders_are_invisible(shop: Shop) -> None:
    phone = await shop.phone(stock=10)
    _, alice = await shop.customer()
    _, bob = await shop.customer()
    order = (await (await shop.order(alice, [(phone["id"], 1)], autocheck=False)).json())["order"]
    for method, path in routes_of_one_order(order["id"]):
        response = await shop.client.request(method, path, headers=bob)
        assert response.status == 404, path
    bobs = await (await shop.client.get("/orders", headers=bob)).json()
    assert bobs["orders"] == [] and bobs["total"] == 0
    alices = await (await shop.client.get("/orders", headers=alice)).json()
    assert [o["id"] for o in alices["orders"]] == [order["id"]]
    assert (await (await shop.client.get(f"/orders/{order['id']}", headers=alice)).json())["order"][
        "status"
    ] == "open"


async def test_an_id_no_order_has_in_the_customers_own_partition_is_404(shop: Shop) -> None:
    """Such an id passes the app's partition check and reaches the status scripts, which
    must answer 404 before reading the order's items: a missing order has none to sum
    (schemathesis found a 500 on POST /orders/check/{id}, 2026-12-03)."""
    customer, auth = await shop.customer()
    missing = new_id(partition_of(customer["id"]))
    for method, path in routes_of_one_order(missing):
        response = await shop.client.request(method, path, headers=auth)
        assert response.status == 404, (path, await response.text())
        assert problem_of(await response.json()) == "order_not_found"
    assert (await shop.audit())["orders"]["total"] == 0


async def test_list_orders_newest_first_with_status_filter(shop: Shop) -> None:
    phone = await shop.phone(price_cents=1, stock=100)
    alice, alice_auth = await shop.customer()
    _, bob_auth = await shop.customer()
    ids = []
    for i in range(12):
        response = await shop.order(alice_auth, [(phone["id"], 1)], autocheck=i % 2 == 0)
        ids.append((await response.json())["order"]["id"])
    await shop.order(bob_auth, [(phone["id"], 1)])
    await shop.client.post(f"/orders/{ids[1]}/cancel", headers=alice_auth)
    first = await (await shop.client.get("/orders?page=1", headers=alice_auth)).json()
    assert (first["total"], first["pageCount"], first["per_page"]) == (12, 2, 10)
    second = await (await shop.client.get("/orders?page=2", headers=alice_auth)).json()
    assert [o["id"] for o in first["orders"] + second["orders"]] == ids[::-1]
    open_ = await (await shop.client.get("/orders?status=open", headers=alice_auth)).json()
    assert [o["id"] for o in open_["orders"]] == [ids[i] for i in (11, 9, 7, 5, 3)]
    cancelled = await (await shop.client.get("/orders?status=cancelled", headers=alice_auth)).json()
    assert [o["id"] for o in cancelled["orders"]] == [ids[1]]
    everyone = await (await shop.client.get("/orders?per_page=100", headers=ADMIN)).json()
    assert everyone["total"] == 13
    only_alice = await (
        await shop.client.get(f"/orders?customer_id={alice['id']}&status=completed", headers=ADMIN)
    ).json()
    assert {o["id"] for o in only_alice["orders"]} == {ids[i] for i in range(0, 12, 2)}
    bad = await shop.client.get("/orders?status=shipped", headers=alice_auth)
    assert bad.status == 422
    assert (await shop.client.get("/orders")).status == 401


async def test_order_line_limits(shop: Shop) -> None:
    phones = [await shop.phone(price_cents=1, stock=1000) for _ in range(51)]
    _, auth = await shop.customer()
    too_many_lines = await shop.order(auth, [(p["id"], 1) for p in phones])
    assert too_many_lines.status == 422
    fifty = await shop.order(auth, [(p["id"], 1) for p in phones[:50]])
    assert fifty.status == 201
    for quantity in (0, 101, -1):
        response = await shop.order(auth, [(phones[0]["id"], quantity)])
        assert response.status == 422, quantity
    repeated = await shop.order(
        auth, [(phones[0]["id"], 1), (phones[1]["id"], 1), (phones[0]["id"], 2)]
    )
    assert repeated.status == 201
    lines = (await repeated.json())["order"]["items"]
    assert [(line["phone_id"], line["quantity"]) for line in lines] == [
        (phones[0]["id"], 3),
        (phones[1]["id"], 1),
    ]
    seed_too_many = await shop.client.post(
        "/orders/create", json={"phones": [phones[0]["id"]] * 51}, headers=auth
    )
    assert seed_too_many.status == 422
    both = await shop.client.post(
        "/orders",
        json={"phones": [phones[0]["id"]], "items": [{"phone_id": phones[0]["id"], "quantity": 1}]},
        headers=auth,
    )
    assert both.status == 422


async def test_audit_reports_an_index_entry_without_its_order(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone()
    _, auth = await shop.customer()
    order = (await (await shop.order(auth, [(phone["id"], 1)])).json())["order"]
    await redis.delete(keys.order(order["id"]))  # the books are now broken
    audit = await shop.audit()
    assert audit["ok"] is False
    assert audit["dangling_index_entries"] == [
        {
            "index": keys.orders_by_status(
                partition_of(order["id"]), order["status"], chunk_of(order["id"])
            ),
            "id": order["id"],
        }
    ]


async def _fill_to(shop: Shop, path: str, field: str, step: int, current: int, limit: int) -> None:
    """Deposit or restock through the API until the figure sits exactly at its limit."""
    amounts = [step] * ((limit - current) // step) + [(limit - current) % step]

    async def add(amount: int) -> None:
        response = await shop.client.post(path, json={field: amount}, headers=ADMIN)
        assert response.status == 200, await response.text()

    # A few at a time: the worker's overload control sheds a wide burst.
    for start in range(0, len(amounts), 4):
        await asyncio.gather(*(add(amount) for amount in amounts[start : start + 4] if amount))


async def test_cancel_never_lifts_a_balance_or_a_stock_past_its_ceiling(
    shop: Shop, redis: Redis
) -> None:
    """The reproduced case: an order of 4,999,000,000,000 cents, the balance filled
    to the ceiling, then a cancel; its refund used to leave 1,004,999,000,000,000."""
    phones = [await shop.phone(price_cents=10**9, stock=10**9) for _ in range(50)]
    customer, auth = await shop.customer(balance_cents=10**12)
    deposit = f"/customers/{customer['id']}/deposit"
    await _fill_to(shop, deposit, "amount_cents", 10**12, 10**12, 5 * 10**12)
    lines = [(phone["id"], 100) for phone in phones[:-1]] + [(phones[-1]["id"], 99)]
    placed = await shop.order(auth, lines, autocheck=False)
    order = (await placed.json())["order"]
    assert order["total_cents"] == 4_999_000_000_000
    await _fill_to(shop, deposit, "amount_cents", 10**12, 10**9, BALANCE_LIMIT)

    before = await snapshot(redis)
    refused = await shop.client.post(f"/orders/{order['id']}/cancel", headers=auth)
    assert refused.status == 409
    problem = await refused.json(content_type="application/problem+json")
    assert problem["code"] == "balance_limit"
    assert (problem["balance_cents"], problem["limit"]) == (BALANCE_LIMIT, BALANCE_LIMIT)
    assert await snapshot(redis) == before

    # Room on the balance after spending 5 * 10**12, but the first line's stock
    # is now at its ceiling.
    spend = await shop.order(auth, [(phone["id"], 100) for phone in phones])
    assert spend.status == 201
    restock = f"/phones/{phones[0]['id']}/restock"
    await _fill_to(shop, restock, "quantity", 10**9, 10**9 - 200, STOCK_LIMIT)
    before = await snapshot(redis)
    refused = await shop.client.post(f"/orders/{order['id']}/cancel", headers=ADMIN)
    assert refused.status == 409
    problem = await refused.json(content_type="application/problem+json")
    assert problem["code"] == "stock_limit"
    assert (problem["phone_id"], problem["stock"]) == (phones[0]["id"], STOCK_LIMIT)
    assert await snapshot(redis) == before

    # Once the stock has room, the cancel goes through and stays under both ceilings.
    assert (await shop.order(auth, [(phones[0]["id"], 100)])).status == 201
    cancelled = await shop.client.post(f"/orders/{order['id']}/cancel", headers=auth)
    assert cancelled.status == 200
    balance = await redis.hget(keys.customer(customer["id"]), "balance_cents")
    assert int(balance) == BALANCE_LIMIT - 5 * 10**12 - 10**11 + 4_999_000_000_000
    assert int(await redis.hget(keys.phone(phones[0]["id"]), "stock")) == STOCK_LIMIT
    assert (await shop.audit())["ok"]
