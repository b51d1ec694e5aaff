"""Idempotency-Key on POST /orders: one order per key, replays byte for byte."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from redis.asyncio import Redis

from app import appkeys, keys
from app.orders.idempotency import record_place
from tests.helpers import ON_BOTH_STACKS, Shop, all_keys, orders_stored, without_shedding

# On one redis-server and on the 3+3 Redis Cluster (`-m cluster`: the cluster runs).
pytestmark = ON_BOTH_STACKS


@pytest.fixture
def app_env(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Bursts here test one key under concurrency, not overload: nothing of them is shed."""
    return without_shedding(app_env, monkeypatch)


async def test_concurrent_requests_with_one_key_make_one_order(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(price_cents=100, stock=1000)
    customer, auth = await shop.customer(balance_cents=100_000)
    headers = {**auth, "Idempotency-Key": "order-1"}
    body = {"items": [{"phone_id": phone["id"], "quantity": 2}]}
    responses = await asyncio.gather(
        *(shop.client.post("/orders", json=body, headers=headers) for _ in range(100))
    )
    bodies = [await response.read() for response in responses]
    statuses = Counter(response.status for response in responses)
    assert set(statuses) <= {201, 409}
    created = {b for r, b in zip(responses, bodies, strict=True) if r.status == 201}
    assert len(created) == 1  # every 201 carries the same body: one order
    replays = [r for r in responses if r.headers.get("Idempotent-Replayed") == "true"]
    assert len(replays) == statuses[201] - 1
    assert await redis.hget(keys.customer(customer["id"]), "balance_cents") == b"99800"
    assert await orders_stored(redis) == 1
    later = await shop.client.post("/orders", json=body, headers=headers)
    assert later.status == 201
    assert await later.read() == created.pop()
    assert later.headers["Idempotent-Replayed"] == "true"


async def test_changed_body_with_same_key_is_422(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(price_cents=100, stock=10)
    _, auth = await shop.customer()
    headers = {**auth, "Idempotency-Key": "k"}
    first = await shop.client.post(
        "/orders", json={"items": [{"phone_id": phone["id"], "quantity": 1}]}, headers=headers
    )
    assert first.status == 201
    changed = await shop.client.post(
        "/orders", json={"items": [{"phone_id": phone["id"], "quantity": 2}]}, headers=headers
    )
    assert changed.status == 422
    body = await changed.json(content_type="application/problem+json")
    assert body["code"] == "idempotency_key_reused"
    assert await orders_stored(redis) == 1


async def test_business_rejection_is_stored_and_replayed(shop: Shop) -> None:
    phone = await shop.phone(price_cents=100, stock=1)
    _, auth = await shop.customer()
    headers = {**auth, "Idempotency-Key": "too-many"}
    body = {"items": [{"phone_id": phone["id"], "quantity": 5}]}
    first = await shop.client.post("/orders", json=body, headers=headers)
    assert first.status == 409
    await shop.client.post(
        f"/phones/{phone['id']}/restock",
        json={"quantity": 100},
        headers={"Authorization": "Bearer test-admin-token-0123456789"},
    )
    # Stock is there now, but the key's answer was decided: replay it.
    replay = await shop.client.post("/orders", json=body, headers=headers)
    assert replay.status == 409
    assert await replay.read() == await first.read()
    assert replay.headers["Idempotent-Replayed"] == "true"
    fresh = await shop.client.post("/orders", json=body, headers={**auth, "Idempotency-Key": "new"})
    assert fresh.status == 201


async def test_validation_failures_are_not_stored(shop: Shop) -> None:
    phone = await shop.phone(price_cents=100, stock=5)
    _, auth = await shop.customer()
    headers = {**auth, "Idempotency-Key": "v"}
    bad = await shop.client.post(
        "/orders", json={"items": [{"phone_id": phone["id"], "quantity": 0}]}, headers=headers
    )
    assert bad.status == 422
    good = await shop.client.post(
        "/orders", json={"items": [{"phone_id": phone["id"], "quantity": 1}]}, headers=headers
    )
    assert good.status == 201


async def test_keys_are_scoped_to_the_customer(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(price_cents=100, stock=5)
    _, alice = await shop.customer()
    _, bob = await shop.customer()
    body = {"items": [{"phone_id": phone["id"], "quantity": 1}]}
    a = await shop.client.post("/orders", json=body, headers={**alice, "Idempotency-Key": "same"})
    b = await shop.client.post("/orders", json=body, headers={**bob, "Idempotency-Key": "same"})
    assert a.status == b.status == 201
    assert (await a.json())["order"]["id"] != (await b.json())["order"]["id"]
    # One record each, as fields of their partitions' time buckets (app/orders/idempotency.py),
    # kept 24 h and at most a bucket's window (another 24 h) more.
    buckets = await all_keys(redis, keys.IDEMPOTENCY_MATCH)
    assert sum([await redis.hlen(bucket) for bucket in buckets]) == 2
    ttl = [await redis.ttl(bucket) for bucket in buckets]
    assert ttl and all(24 * 3600 <= t <= 48 * 3600 for t in ttl)


async def test_a_record_of_the_window_before_is_replayed_and_one_older_is_not_read(
    shop: Shop, redis: Redis
) -> None:
    """A lookup reads the newest bucket and the one before it (windows a TTL wide): a
    record made up to a TTL ago is in one of them; an older bucket is never read (it
    expires a TTL after its window ends). The record is moved between buckets to stand
    for one written a window ago."""
    phone = await shop.phone(price_cents=100, stock=10)
    customer, auth = await shop.customer(balance_cents=10_000)
    headers = {**auth, "Idempotency-Key": "yesterday"}
    body = {"items": [{"phone_id": phone["id"], "quantity": 1}]}
    first = await shop.client.post("/orders", json=body, headers=headers)
    assert first.status == 201
    ttl = shop.client.app[appkeys.SETTINGS].idempotency_ttl_seconds
    now = int(time.time())
    record = record_place(customer["id"], "yesterday", ttl, now)
    value = await redis.hget(record.newest, record.field)
    assert value is not None
    windows_back = [
        record_place(customer["id"], "yesterday", ttl, now - back * ttl).newest for back in (1, 2)
    ]
    assert windows_back[0] == record.older[0] and len(record.older) == 1

    async def move_record(to: str) -> None:
        for bucket in (record.newest, *windows_back):
            await redis.hdel(bucket, record.field)
        await redis.hset(to, record.field, value)

    await move_record(windows_back[0])
    replay = await shop.client.post("/orders", json=body, headers=headers)
    assert replay.status == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert await replay.read() == await first.read()
    assert await orders_stored(redis) == 1
    await move_record(windows_back[1])
    again = await shop.client.post("/orders", json=body, headers=headers)
    assert again.status == 201 and "Idempotent-Replayed" not in again.headers
    assert await orders_stored(redis) == 2


async def test_invalid_keys_are_400(shop: Shop) -> None:
    phone = await shop.phone()
    _, auth = await shop.customer()
    body = {"items": [{"phone_id": phone["id"], "quantity": 1}]}
    for key in ("", "x" * 256, "has space", "é"):
        response = await shop.client.post(
            "/orders", json=body, headers={**auth, "Idempotency-Key": key}
        )
        assert response.status == 400, key
    assert (await shop.audit())["orders"]["total"] == 0


async def test_a_replay_answers_the_first_body_after_the_order_moved_on(shop: Shop) -> None:
    """The record keeps only the order's id (app/orders/idempotency.py): the replay is
    rebuilt from the order, with the status it was created with, not today's."""
    phone = await shop.phone(price_cents=100, stock=5)
    _, auth = await shop.customer()
    headers = {**auth, "Idempotency-Key": "rebuilt"}
    body = {"items": [{"phone_id": phone["id"], "quantity": 1}], "autocheck": False}
    first = await shop.client.post("/orders", json=body, headers=headers)
    assert first.status == 201
    order_id = (await first.json())["order"]["id"]
    checked = await shop.client.post(f"/orders/{order_id}/check", headers=auth)
    assert (await checked.json())["order"]["status"] == "completed"
    replay = await shop.client.post("/orders", json=body, headers=headers)
    assert replay.status == 201
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert await replay.read() == await first.read()
    assert (await replay.json())["order"]["status"] == "open"
