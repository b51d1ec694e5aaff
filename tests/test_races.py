"""Concurrency: many requests racing on one phone, one balance, one order, one key.

Each race runs through the real app and the real Redis; the outcome must be
exactly what a serial execution allows, whatever the interleaving. Each race also
runs on the 3+3 Redis Cluster (ON_BOTH_STACKS); in the oversell and the balance races
every customer is on another primary than the phone, so each order is the reservation
saga across two shards: the same outcome, and the audit over every shard at rest.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from redis.asyncio import Redis

from app import keys
from tests.helpers import (
    ADMIN,
    ON_BOTH_STACKS,
    Placement,
    Shop,
    all_events,
    without_shedding,
)


@pytest.fixture
def app_env(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Bursts here test the races, not overload: nothing of them is shed."""
    return without_shedding(app_env, monkeypatch)


async def customers_away_from(
    shop: Shop, placement: Placement, phone: dict, count: int, balance_cents: int
) -> list[tuple[dict, dict[str, str]]]:
    """``count`` new customers, each on another primary than the phone when on the
    cluster (on one redis-server there is one primary for all)."""
    phone_primary = await placement.primary(keys.phone(phone["id"]))
    chosen: list[tuple[dict, dict[str, str]]] = []
    while len(chosen) < count:
        customer = await shop.customer(balance_cents=balance_cents)
        primary = await placement.primary(keys.customer(customer[0]["id"]))
        if not placement.on_cluster or primary != phone_primary:
            chosen.append(customer)
    return chosen


@ON_BOTH_STACKS
async def test_oversell_race_exactly_stock_succeeds(
    shop: Shop, redis: Redis, placement: Placement
) -> None:
    phone = await shop.phone(price_cents=100, stock=10)
    customers = await customers_away_from(shop, placement, phone, 50, balance_cents=10_000)
    requests = [shop.order(customers[i % 50][1], [(phone["id"], 1)]) for i in range(500)]
    responses = await asyncio.gather(*requests)
    statuses = Counter(response.status for response in responses)
    assert statuses == {201: 10, 409: 490}
    assert await redis.hget(keys.phone(phone["id"]), "stock") == b"0"
    audit = await shop.audit_at_rest()
    assert audit["ok"] and audit["orders"]["total"] == 10
    assert audit["stock"]["ok"] and audit["money"]["ok"]


@ON_BOTH_STACKS
async def test_balance_race_never_overdraws(shop: Shop, redis: Redis, placement: Placement) -> None:
    phone = await shop.phone(price_cents=700, stock=1000)
    [(customer, auth)] = await customers_away_from(shop, placement, phone, 1, 3 * 700)
    responses = await asyncio.gather(*(shop.order(auth, [(phone["id"], 1)]) for _ in range(50)))
    statuses = Counter(response.status for response in responses)
    assert statuses == {201: 3, 402: 47}
    assert await redis.hget(keys.customer(customer["id"]), "balance_cents") == b"0"
    audit = await shop.audit_at_rest()
    assert audit["ok"] and audit["orders"]["total"] == 3
    assert audit["stock"]["ok"] and audit["money"]["ok"]


@ON_BOTH_STACKS
async def test_check_and_cancel_race_exactly_one_wins(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(price_cents=100, stock=100)
    _, auth = await shop.customer(balance_cents=100_000)
    for _ in range(20):
        order = (await (await shop.order(auth, [(phone["id"], 1)], autocheck=False)).json())[
            "order"
        ]
        check, cancel = await asyncio.gather(
            shop.client.post(f"/orders/{order['id']}/check", headers=auth),
            shop.client.post(f"/orders/{order['id']}/cancel", headers=ADMIN),
        )
        assert sorted([check.status, cancel.status]) == [200, 409]
        final = (await (await shop.client.get(f"/orders/{order['id']}", headers=auth)).json())[
            "order"
        ]["status"]
        assert final == ("completed" if check.status == 200 else "cancelled")
    audit = await shop.audit()
    assert audit["ok"]
    assert audit["orders"]["completed"] + audit["orders"]["cancelled"] == 20
    events = Counter(f[b"type"] for _, f in await all_events(redis))
    assert events[b"order.completed"] + events[b"order.cancelled"] == 20
