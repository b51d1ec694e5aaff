"""Customers: creation with a one-time token, unique emails, deposits, access."""

from __future__ import annotations

import hashlib

from redis.asyncio import Redis

from app import keys
from app.partitions import partition_for_email, partition_of
from tests.helpers import ADMIN, ON_BOTH_STACKS, Shop, all_keys

# On one redis-server and on the 3+3 Redis Cluster (`-m cluster`: the cluster runs).
pytestmark = ON_BOTH_STACKS


async def test_create_customer_returns_token_once_stored_hashed(shop: Shop, redis: Redis) -> None:
    response = await shop.client.post(
        "/customers",
        json={
            "name": "Grace",
            "surname": "Hopper",
            "email": "grace@example.com",
            "balance_cents": 500,
        },
        headers=ADMIN,
    )
    assert response.status == 201
    body = await response.json()
    customer, token = body["customer"], body["token"]
    assert customer["balance_cents"] == 500 and customer["email"] == "grace@example.com"
    assert len(token) >= 40
    # The token itself is nowhere in Redis; only its SHA-256 is.
    dump = b"".join(
        [
            key + b"".join(str(v).encode() for v in [await redis.dump(key)])
            for key in await all_keys(redis)
        ]
    )
    assert token.encode() not in dump
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert await redis.get(keys.customer_token(token, digest)) == customer["id"].encode()
    # The token, the customer and its email index share the partition the email chose.
    partition = partition_for_email("grace@example.com")
    assert partition_of(token) == partition_of(customer["id"]) == partition
    own = await shop.client.get(
        f"/customers/{customer['id']}", headers={"Authorization": f"Bearer {token}"}
    )
    assert (await own.json())["customer"] == customer


async def test_email_is_unique_ignoring_case(shop: Shop) -> None:
    body = {"name": "A", "surname": "B", "email": "Same@Example.com"}
    assert (await shop.client.post("/customers", json=body, headers=ADMIN)).status == 201
    again = await shop.client.post(
        "/customers", json={**body, "email": "same@example.COM"}, headers=ADMIN
    )
    assert again.status == 409
    assert (await again.json(content_type="application/problem+json"))["code"] == "email_taken"


async def test_customer_is_visible_to_self_and_admin_only(shop: Shop) -> None:
    alice, alice_auth = await shop.customer()
    _, bob_auth = await shop.customer()
    assert (await shop.client.get(f"/customers/{alice['id']}", headers=ADMIN)).status == 200
    assert (await shop.client.get(f"/customers/{alice['id']}", headers=alice_auth)).status == 200
    assert (await shop.client.get(f"/customers/{alice['id']}", headers=bob_auth)).status == 404
    assert (await shop.client.get(f"/customers/{alice['id']}")).status == 401


async def test_deposit_adds_money(shop: Shop, redis: Redis) -> None:
    customer, auth = await shop.customer(balance_cents=100)
    response = await shop.client.post(
        f"/customers/{customer['id']}/deposit", json={"amount_cents": 250}, headers=ADMIN
    )
    assert response.status == 200
    assert (await response.json())["customer"]["balance_cents"] == 350
    assert await redis.hget(keys.customer(customer["id"]), "added_cents") == b"350"
    by_customer = await shop.client.post(
        f"/customers/{customer['id']}/deposit", json={"amount_cents": 1}, headers=auth
    )
    assert by_customer.status == 403
    missing = await shop.client.post(
        "/customers/AAAAAAAAAAAAAAAAAAAAAA/deposit", json={"amount_cents": 1}, headers=ADMIN
    )
    assert missing.status == 404
    assert (await shop.audit())["ok"]


async def test_deposit_refused_past_the_balance_limit(shop: Shop) -> None:
    customer, _ = await shop.customer(balance_cents=10**12)
    for _ in range(1000):
        response = await shop.client.post(
            f"/customers/{customer['id']}/deposit", json={"amount_cents": 10**12}, headers=ADMIN
        )
        if response.status != 200:
            break
    assert response.status == 409
    problem = await response.json(content_type="application/problem+json")
    assert problem["code"] == "balance_limit"
    assert problem["balance_cents"] == 10**15


async def test_customer_validation(shop: Shop) -> None:
    good = {"name": "A", "surname": "B", "email": "a@example.com", "balance_cents": 0}
    for field, value in (
        ("email", "not-an-email"),
        ("email", "a@example.com\r\nBcc: evil@example.com"),
        ("email", "a@example.com\n"),
        ("name", "Eve\r\nBcc: x@example.com"),
        ("name", "tab\there"),
        ("name", ""),
        ("name", "x" * 201),
        ("balance_cents", -1),
        ("balance_cents", 10**12 + 1),
        ("balance_cents", 1.5),
    ):
        response = await shop.client.post("/customers", json={**good, field: value}, headers=ADMIN)
        assert response.status == 422, (field, value)
    assert (await shop.audit())["money"]["customers"] == 0
