"""Bad input gets a clear 4xx problem+json and changes nothing; never a 5xx."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from app.json_body import MAX_JSON_DEPTH
from tests.helpers import ADMIN, ON_BOTH_STACKS, Shop, snapshot

# On one redis-server and on the 3+3 Redis Cluster (`-m cluster`: the cluster runs).
pytestmark = ON_BOTH_STACKS

# Raw JSON texts put where an integer is expected.
BAD_NUMBERS = [
    "0",
    "-1",
    "1.5",
    '"1"',
    "true",
    "null",
    "NaN",
    "Infinity",
    "1e309",
    "1e999999999",  # integral, but a billion digits: refused without building it
    "2.5e-999999999",
    str(2**63),
    "9" * 5000,
    '"١٢"',  # Arabic-Indic digits, as a string
    "١٢",  # and bare, which is not JSON
    "[]",
    "{}",
]


@pytest.fixture
async def world(shop: Shop) -> dict:
    phone = await shop.phone(price_cents=100, stock=5)
    customer, auth = await shop.customer(balance_cents=10_000)
    return {"phone": phone, "customer": customer, "auth": auth}


def targets(world: dict) -> list[tuple[str, str, str, dict[str, str]]]:
    """(method, path, body template with {n} for the bad number, headers)."""
    phone_id, customer_id = world["phone"]["id"], world["customer"]["id"]
    return [
        (
            "POST",
            "/orders",
            f'{{"items": [{{"phone_id": "{phone_id}", "quantity": {{n}}}}]}}',
            world["auth"],
        ),
        ("POST", "/phones", '{"name": "x", "price_cents": {n}}', ADMIN),
        ("POST", "/phones", '{"name": "x", "price_cents": 5, "stock": {n}}', ADMIN),
        ("POST", f"/phones/{phone_id}/restock", '{"quantity": {n}}', ADMIN),
        ("PATCH", f"/phones/{phone_id}", '{"price_cents": {n}}', ADMIN),
        (
            "POST",
            "/customers",
            '{"name": "a", "surname": "b", "email": "n@example.com", "balance_cents": {n}}',
            ADMIN,
        ),
        ("POST", f"/customers/{customer_id}/deposit", '{"amount_cents": {n}}', ADMIN),
    ]


async def test_bad_numbers_are_refused_and_change_nothing(
    shop: Shop, redis: Redis, world: dict
) -> None:
    before = await snapshot(redis)
    checked = 0
    for method, path, template, headers in targets(world):
        for bad in BAD_NUMBERS:
            if bad == "0" and ('"stock"' in template or '"balance_cents"' in template):
                continue  # an opening stock or balance of 0 is valid
            body = template.replace("{n}", bad).replace("{{", "{").replace("}}", "}")
            response = await shop.client.request(
                method,
                path,
                data=body.encode(),
                headers={**headers, "Content-Type": "application/json"},
            )
            assert 400 <= response.status < 500, (path, bad, response.status)
            assert response.content_type == "application/problem+json"
            problem = await response.json(content_type="application/problem+json")
            assert problem["status"] == response.status and problem["code"]
            checked += 1
    assert checked > 90
    assert await snapshot(redis) == before


async def test_fields_a_client_must_not_set_are_refused(
    shop: Shop, redis: Redis, world: dict
) -> None:
    phone_id = world["phone"]["id"]
    before = await snapshot(redis)
    for extra in (
        {"status": "completed"},
        {"price_cents": 1},
        {"balance_cents": 10**9},
        {"total_cents": 0},
    ):
        response = await shop.client.post(
            "/orders",
            json={"items": [{"phone_id": phone_id, "quantity": 1}], **extra},
            headers=world["auth"],
        )
        assert response.status == 422, extra
        line = await shop.client.post(
            "/orders",
            json={"items": [{"phone_id": phone_id, "quantity": 1, **extra}]},
            headers=world["auth"],
        )
        assert line.status == 422, extra
    for extra in ({"balance_cents": 5}, {"id": "x"}):
        response = await shop.client.patch(
            f"/phones/{phone_id}", json={"name": "n", **extra}, headers=ADMIN
        )
        assert response.status == 422
    assert await snapshot(redis) == before


async def test_malformed_bodies_and_content_types(shop: Shop, redis: Redis, world: dict) -> None:
    auth = world["auth"]
    before = await snapshot(redis)
    cases = [
        (b'{"items": [', "application/json", 400),
        (b"not json", "application/json", 400),
        (b"", "application/json", 400),
        (b"\xff\xfe", "application/json", 400),
        (b"[]", "application/json", 422),
        (b'{"items": []}', "application/json", 422),
        (b'{"items": [{"phone_id": "x", "quantity": 1}]}', "text/plain", 415),
        (b"items=1", "application/x-www-form-urlencoded", 415),
    ]
    for body, content_type, status in cases:
        response = await shop.client.post(
            "/orders", data=body, headers={**auth, "Content-Type": content_type}
        )
        assert response.status == status, (body, content_type)
        assert response.content_type == "application/problem+json"
    no_type = await shop.client.post("/orders", data=b"{}", headers={**auth, "Content-Type": ""})
    assert no_type.status == 415
    assert await snapshot(redis) == before


async def test_bad_ids_never_reach_a_key(shop: Shop, redis: Redis, world: dict) -> None:
    before = await snapshot(redis)
    for phone_id in ("*", "phone:x", "a" * 23, "", "../../x", "AAAAAAAAAAAAAAAAAAAAA\n"):
        response = await shop.client.post(
            "/orders",
            json={"items": [{"phone_id": phone_id, "quantity": 1}]},
            headers=world["auth"],
        )
        assert response.status == 422, phone_id
    for path in ("/orders/*", "/orders/AAAA", "/customers/*", "/orders/%0A/check"):
        response = await shop.client.get(path, headers=ADMIN)
        assert response.status in (404, 405), path
    assert await snapshot(redis) == before


async def test_unknown_routes_and_methods_are_problems(shop: Shop) -> None:
    missing = await shop.client.get("/nope")
    assert missing.status == 404
    assert (await missing.json(content_type="application/problem+json"))["code"] == "not_found"
    wrong = await shop.client.delete("/phones")
    assert wrong.status == 405
    assert "GET" in wrong.headers["Allow"]
    assert (await wrong.json(content_type="application/problem+json"))[
        "code"
    ] == "method_not_allowed"


async def test_oversized_body_is_413(shop: Shop, world: dict) -> None:
    response = await shop.client.post(
        "/orders",
        data=b"{" + b" " * 100_000 + b"}",
        headers={**world["auth"], "Content-Type": "application/json"},
    )
    assert response.status == 413
    assert response.content_type == "application/problem+json"


async def test_deeply_nested_json_is_refused_on_every_write_endpoint(
    shop: Shop, redis: Redis, world: dict
) -> None:
    """500 levels used to raise RecursionError in the walks over the document (a 500)."""
    phone_id, customer_id = world["phone"]["id"], world["customer"]["id"]
    writes = [
        ("POST", "/orders", world["auth"]),
        ("POST", "/orders/create", world["auth"]),
        ("POST", "/phones", ADMIN),
        ("POST", "/phones/create", ADMIN),
        ("PATCH", f"/phones/{phone_id}", ADMIN),
        ("POST", f"/phones/{phone_id}/restock", ADMIN),
        ("POST", "/customers", ADMIN),
        ("POST", f"/customers/{customer_id}/deposit", ADMIN),
    ]
    before = await snapshot(redis)
    for depth in (MAX_JSON_DEPTH + 1, 500, 6000):  # 6000: past msgspec's own guard
        for nested in (b'{"a":' * depth + b"1" + b"}" * depth, b"[" * depth + b"]" * depth):
            body = b'{"items":' + nested + b"}"
            for method, path, headers in writes:
                response = await shop.client.request(
                    method, path, data=body, headers={**headers, "Content-Type": "application/json"}
                )
                assert response.status == 400, (path, depth, response.status)
                problem = await response.json(content_type="application/problem+json")
                assert problem["code"] == "json_too_deep", (path, depth)
    assert await snapshot(redis) == before
    # The limit leaves room: MAX_JSON_DEPTH levels are read and judged on their fields.
    nested = b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1)
    response = await shop.client.post(
        "/orders",
        data=b'{"items":' + nested + b"}",
        headers={**world["auth"], "Content-Type": "application/json"},
    )
    assert response.status == 422
