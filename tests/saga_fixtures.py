"""The reservation saga's test world, on a real redis-server and on the real 3-primary
cluster (tests/cluster.py): the scripts run through the gateway the app uses, over
redis-py's RedisCluster on the cluster; a decoding client reads and seeds the hashes.

Phones are seeded as their hashes (id, price_cents, stock, added_units), so these tests
depend only on the saga's scripts and on app/keys.py's names, not on how phones are
created. The order's partition and the phones' partitions are chosen on different
primaries of the cluster (partition p lives in slot 128·p; with 3 primaries 0-42, 43-85
and 86-127 are each on one).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from app import keys, partitions
from app.redis_gateway import ClientTransport, RedisGateway
from app.scripts import Scripts
from loadtests.support.servers import RedisServer

# The order's (customer's) partition and two phone partitions, on three primaries.
ORDER_PARTITION = 100
PHONE_PARTITION = 5
OTHER_PHONE_PARTITION = 60


@dataclass
class SagaWorld:
    backend: str
    scripts: Scripts
    gateway: RedisGateway
    # Decoded replies, for seeding and reading hashes in the tests.
    redis: Redis | RedisCluster

    async def phone(self, partition: int, *, price_cents: int, stock: int) -> str:
        phone_id = partitions.new_id(partition)
        await self.redis.hset(
            keys.phone(phone_id),
            mapping={
                "id": phone_id,
                "price_cents": price_cents,
                "stock": stock,
                "added_units": stock,
            },
        )
        return phone_id

    async def units(self, phone_id: str) -> dict[str, int]:
        """A phone's stock, held, sold and added_units (0 for a field not there)."""
        row = await self.redis.hmget(keys.phone(phone_id), "stock", "held", "sold", "added_units")
        return dict(
            zip(("stock", "held", "sold", "added"), (int(v or 0) for v in row), strict=True)
        )

    async def ledger(self, partition: int) -> dict[str, int]:
        fields = await self.redis.hgetall(keys.partition_ledger(partition))
        return {name: int(value) for name, value in fields.items()}

    def node_of(self, key: str) -> str:
        """The primary serving the key (one name for every key on one node)."""
        if isinstance(self.redis, RedisCluster):
            return self.redis.get_node_from_key(key).name
        return "single"


async def _single(server: RedisServer) -> AsyncIterator[SagaWorld]:
    redis = Redis.from_url(server.url, decode_responses=True)
    await redis.flushall()
    gateway = RedisGateway(ClientTransport(Redis.from_url(server.url)))
    yield SagaWorld("single", Scripts(gateway), gateway, redis)
    await gateway.aclose()
    await redis.aclose()


class ClusterScriptsTransport(ClientTransport):
    """ClientTransport over a RedisCluster, which routes EVALSHA by its keys; only the
    gateway's keyless ``SCRIPT LOAD`` (after NOSCRIPT) needs a target: every primary.
    The app's own cluster transport (issue 11, redis_gateway) takes this one's place."""

    async def execute(self, *args: Any) -> Any:
        if args[:2] == ("SCRIPT", "LOAD"):
            return await self._client.execute_command(
                "SCRIPT LOAD", *args[2:], target_nodes=RedisCluster.PRIMARIES
            )
        return await super().execute(*args)


async def _cluster(ports: list[int]) -> AsyncIterator[SagaWorld]:
    nodes = [ClusterNode("127.0.0.1", port) for port in ports]
    redis = RedisCluster(startup_nodes=nodes, decode_responses=True)
    await redis.initialize()
    await redis.execute_command("FLUSHALL", target_nodes=RedisCluster.PRIMARIES)
    gateway = RedisGateway(ClusterScriptsTransport(RedisCluster(startup_nodes=nodes)))
    yield SagaWorld("cluster", Scripts(gateway), gateway, redis)
    await gateway.aclose()
    await redis.aclose()


@pytest.fixture(params=["single", "cluster"])
async def saga(request: pytest.FixtureRequest) -> AsyncIterator[SagaWorld]:
    """The saga's world on one redis-server, then on the cluster (a flushed database each)."""
    if request.param == "single":
        world = _single(request.getfixturevalue("redis_server"))
    else:
        if "{" not in keys.phone(partitions.new_id(PHONE_PARTITION)):
            # Until app/keys.py's phone and order names carry their partition's hash tag
            # (issue 11's key layout), a phone is in no partition's slot: CROSSSLOT.
            pytest.skip("app/keys.py's phone and order keys have no hash tag yet")
        world = _cluster(request.getfixturevalue("redis_cluster").ports[:3])
    async for value in world:
        yield value
