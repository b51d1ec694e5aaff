"""The API on a real Redis Cluster: the single-partition operations (a customer, a
deposit, a phone, reading them back and listing them) through the app wired to the
cluster exactly as REDIS_CLUSTER_NODES wires it, each script [EVALSHA, SET, WAIT 1] on
its partition's primary."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app import partitions
from app.main import create_app
from app.ops.redis_cluster import LocalCluster
from tests.helpers import ADMIN, ADMIN_TOKEN, CLUSTER, Shop

# The fixture `redis` on the cluster: the session's shared cluster, flushed for this test
# (the catalogue check below reads page 1, which earlier tests' phones would fill).
pytestmark = pytest.mark.parametrize(
    "stack_kind", [pytest.param(CLUSTER, marks=pytest.mark.cluster)], indirect=True
)


@pytest.fixture
async def cluster_shop(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch, redis_cluster: LocalCluster, redis: Redis
) -> Shop:
    nodes = ",".join(f"127.0.0.1:{port}" for port in redis_cluster.ports[:3])
    for name, value in {
        "REDIS_URL": "redis://127.0.0.1/0",
        "REDIS_CLUSTER_NODES": nodes,
        "ADMIN_TOKEN": ADMIN_TOKEN,
    }.items():
        monkeypatch.setenv(name, value)
    client: TestClient = await aiohttp_client(await create_app())
    return Shop(client)


async def test_customers_deposits_and_phones_on_the_cluster(
    redis_cluster: LocalCluster, cluster_shop: Shop
) -> None:
    client = cluster_shop.client
    view = redis_cluster.topology()
    phones = [await cluster_shop.phone(price_cents=10_000 + i, stock=5) for i in range(6)]
    customers = [await cluster_shop.customer(balance_cents=50_000) for _ in range(6)]
    # Spread over more than one primary, as the partitions are.
    owners = {
        view.primary_for_slot(partitions.slot(partitions.partition_of(item["id"]))).port
        for item in [*phones, *(customer for customer, _ in customers)]
    }
    assert len(owners) > 1, owners

    for customer, auth in customers:
        deposited = await client.post(
            f"/customers/{customer['id']}/deposit", json={"amount_cents": 1_000}, headers=ADMIN
        )
        assert deposited.status == 200, await deposited.text()
        assert (await deposited.json())["customer"]["balance_cents"] == 51_000
        mine = await client.get(f"/customers/{customer['id']}", headers=auth)
        assert mine.status == 200, await mine.text()
        assert (await mine.json())["customer"]["balance_cents"] == 51_000

    for phone in phones:
        read = await client.get(f"/phones/{phone['id']}")
        assert read.status == 200, await read.text()
        assert (await read.json())["phone"] == phone

    # The catalogue merges every partition's list, whichever primary holds it.
    listed = await client.get("/phones", params={"page": 1})
    assert listed.status == 200, await listed.text()
    page = await listed.json()
    assert {phone["id"] for phone in phones} <= {phone["id"] for phone in page["phones"]}
