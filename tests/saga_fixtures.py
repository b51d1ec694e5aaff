"""The reservation saga's test world, on a real redis-server and on the real 3-primary
cluster (tests/cluster.py): the scripts run through the gateway the app uses, over
redis-py's RedisCluster on the cluster; a decoding client reads and seeds the hashes.

On the cluster the scripts go through the app's own cluster gateway (app/cluster_gateway.py),
so each is also acknowledged by its primary's replica. Phones are seeded as their hashes (id, price_cents, stock, added_units), so these tests
depend only on the saga's scripts and on app/keys.py's names, not on how phones are
created. The order's partition and the phones' partitions are chosen on different
primaries of the cluster (partition p lives in slot 128·p; with 3 primaries 0-42, 43-85
and 86-127 are each on one).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from app import keys, partitions
from app.cluster_gateway import open_cluster_gateway
from app.ops.redis_cluster import wait_ready
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

    # Each partition's ledger as the test found it: on the session's cluster other tests'
    # data may share these partitions, so the tests see only their own moves.
    ledger_before: dict[int, dict[str, int]] = field(default_factory=dict)

    async def _ledger_now(self, partition: int) -> dict[str, int]:
        fields = await self.redis.hgetall(keys.ledger(partition))
        return {name: int(value) for name, value in fields.items()}

    async def remember_ledgers(self) -> None:
        for partition in (ORDER_PARTITION, PHONE_PARTITION, OTHER_PHONE_PARTITION):
            self.ledger_before[partition] = await self._ledger_now(partition)

    async def ledger(self, partition: int) -> dict[str, int]:
        """The moves of the partition's ledger since the test began (fields that moved)."""
        now, before = await self._ledger_now(partition), self.ledger_before.get(partition, {})
        moved = {name: value - before.get(name, 0) for name, value in now.items()}
        return {name: value for name, value in moved.items() if value}

    def node_of(self, key: str) -> str:
        """The primary serving the key (one name for every key on one node)."""
        if isinstance(self.redis, RedisCluster):
            return self.redis.get_node_from_key(key).name
        return "single"


async def _single(server: RedisServer) -> AsyncIterator[SagaWorld]:
    redis = Redis.from_url(server.url, decode_responses=True)
    await redis.flushall()
    # A blocking pool, as the app's: a burst of calls waits for a connection instead of
    # failing (the race tests send hundreds at once).
    pool = BlockingConnectionPool.from_url(server.url, max_connections=64)
    gateway = RedisGateway(ClientTransport(Redis(connection_pool=pool)))
    yield SagaWorld("single", Scripts(gateway), gateway, redis)
    await gateway.aclose()
    await pool.aclose()  # a client does not close a pool it was given
    await redis.aclose()


def _saga_keys(partition: int) -> list[str]:
    """The partition's keys only the saga writes (its ledger is everyone's: not here)."""
    return [
        keys.reservations(partition),
        keys.reservations_due(partition),
        keys.releases(partition),
        keys.releases_due(partition),
        keys.aborts(partition),
        keys.aborts_due(partition),
        keys.take_backs_due(partition),
        keys.taken_back(partition),
        keys.settler_lease(partition),
    ]


async def _cluster(ports: list[int]) -> AsyncIterator[SagaWorld]:
    """The app's own cluster gateway (every script as [EVALSHA, WAIT 1] on one connection
    of its primary). The cluster is the session's, shared with other modules: only the
    partition-wide keys of the partitions used here are cleared, never the whole cluster."""
    # Right after the session's cluster formed, a primary refuses writes (NOREPLICAS)
    # until its replica links: wait for every node to take them.
    seeds = [("127.0.0.1", port) for port in ports]
    assert await asyncio.to_thread(wait_ready, seeds, 60.0) == 0
    nodes = [ClusterNode("127.0.0.1", port) for port in ports]
    redis = RedisCluster(startup_nodes=nodes, decode_responses=True)
    await redis.initialize()
    for partition in (ORDER_PARTITION, PHONE_PARTITION, OTHER_PHONE_PARTITION):
        await redis.delete(*_saga_keys(partition))
    gateway = open_cluster_gateway(
        "redis://127.0.0.1",
        tuple(("127.0.0.1", port) for port in ports),
        replicas=1,
        wait_ms=2000,
        socket_timeout=5.0,
        # redis-py's per-node pools do not wait for a free connection (MaxConnectionsError
        # past the limit), and the race tests send 200 calls to one node at once.
        max_connections=256,
    )
    yield SagaWorld("cluster", Scripts(gateway), gateway, redis)
    await gateway.aclose()
    await redis.aclose()


@pytest.fixture(params=["single", "cluster"])
async def saga(request: pytest.FixtureRequest) -> AsyncIterator[SagaWorld]:
    """The saga's world on one redis-server, then on the cluster (a flushed database each)."""
    if request.param == "single":
        world = _single(request.getfixturevalue("redis_server"))
    else:
        world = _cluster(request.getfixturevalue("redis_cluster").ports)
    async for value in world:
        await value.remember_ledgers()
        yield value
