"""Escrow's crash after a recall's closes (docs/escrow.md, sections 5 and 8), on the real
3+3 cluster with real gunicorn instances (REDIS_CLUSTER_NODES): an order short on a pool
whose phone lent units to a stripe on another primary meets stock_lent and recalls; its
worker dies by its test-only fault point (SAGA_FAULT_POINT=closed) once the stripe is
closed and its units shipped, before the pool received them. The settler of the other
instance finishes the recall (the phone is due on sw{Q} after its grace, the shipment on
sz{S}), and the client's retry with its Idempotency-Key (nothing was stored for the dead
request) is then placed once. Money and units are conserved throughout.

The stripe is made by the real grant (tests/escrow_staging.py: reserve_grant,
receive_grant, settle; the phone's mode striped set by hand, TEST-ONLY)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from app import keys
from app.ops.poll import wait_until_async
from app.ops.redis_cluster import LocalCluster
from app.partitions import PARTITIONS, partition_of
from loadtests.support.stack import AppInstance
from tests import escrow_staging
from tests.crash_fixtures import (
    RECOVERY_S,
    api_world,
    at_rest,
    balance,
    cluster_env,
    crash_instance,
    dies,
)
from tests.saga_fixtures import SagaWorld, _cluster

pytestmark = pytest.mark.cluster


def _instance(cluster: LocalCluster, directory: Path, index: int, fault: str) -> AppInstance:
    return crash_instance(directory, index, fault, **cluster_env(cluster))


@pytest.fixture(scope="module")
def healthy(
    redis_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AppInstance]:
    """The instance that survives: its settler finishes what the killed one left."""
    instance = _instance(redis_cluster, tmp_path_factory.mktemp("recall-healthy"), 0, "")
    instance.start()
    yield instance
    instance.terminate()


@pytest.fixture
async def world(redis_cluster: LocalCluster) -> AsyncIterator[SagaWorld]:
    async for value in _cluster(redis_cluster.ports):
        yield value


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_killed_after_a_recalls_closes_the_settler_brings_the_units_home(
    redis_cluster: LocalCluster,
    healthy: AppInstance,
    world: SagaWorld,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    redis = world.redis
    phone, customer, auth = await api_world(http, healthy.url)
    phone_node = world.node_of(keys.phone(phone["id"]))
    host = next(p for p in range(PARTITIONS) if world.node_of(keys.ledger(p)) != phone_node)
    await escrow_staging.grant(world.scripts, redis, phone["id"], host, 4)
    pool = keys.phone(phone["id"])
    assert await redis.hmget(pool, "stock", "lent") == ["1", "4"]
    keyed = {**auth, "Idempotency-Key": f"crash-recall-{customer['id']}"}
    order = {"items": [{"phone_id": phone["id"], "quantity": 3}]}
    shipment = f"{phone['id']}:{host}:0"
    dying = _instance(redis_cluster, tmp_path, 1, "closed")
    dying.start()
    try:
        await dies(http, f"{dying.url}/orders", order, keyed)
        # Dead after the close: the stripe is closed and its units are on their way.
        assert await redis.hget(keys.stripe(host, phone["id"]), "closed") == "1"
        assert await redis.hget(keys.shipments(host), shipment) == f"{phone['id']}:4:0:0"
        assert await redis.hmget(pool, "stock", "lent", "mode") == ["1", "4", "draining"]

        async def recalled() -> bool:
            stock, lent, mode = await redis.hmget(pool, "stock", "lent", "mode")
            due = await redis.zscore(keys.shipments_due(host), shipment)
            return (stock, lent, mode, due) == ("5", "0", None, None)

        await wait_until_async(recalled, "the settler to finish the recall", RECOVERY_S)
        assert await redis.zscore(keys.drains_due(partition_of(phone["id"])), phone["id"]) is None
        assert await redis.sismember(keys.taken_back(partition_of(phone["id"])), shipment)
        assert await balance(redis, customer["id"]) == 1000
        async with http.post(f"{healthy.url}/orders", json=order, headers=keyed) as response:
            assert response.status == 201, await response.text()
            assert "Idempotent-Replayed" not in response.headers
        assert await at_rest(redis, phone["id"]) == {"stock": 2, "sold": 3, "added": 5}
        assert await balance(redis, customer["id"]) == 1000 - 300
    finally:
        dying.kill()
