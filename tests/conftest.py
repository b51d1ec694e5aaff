"""Fixtures over real processes: one redis-server per session on a free port,
flushed before each test, and the aiohttp app wired to it through the same
environment variables production uses.

``stack_kind`` says which data tier ``redis``, ``app_env`` and so ``client``/``shop`` use:
``one-node`` (the default) or, for a test parametrized with ``ON_BOTH_STACKS``
(tests/helpers.py), also ``cluster``: the session's 3+3 Redis Cluster (tests/cluster.py),
wired as REDIS_CLUSTER_NODES wires it, so with the reservation saga on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from app.main import create_app
from app.ops.redis_cluster import LocalCluster, wait_ready
from app.orders.chunk_hints import HINTS
from app.orders.stripes import STRIPE_HINTS
from loadtests.support.servers import RedisServer, free_port
from tests.helpers import ADMIN_TOKEN, CLUSTER, ONE_NODE, Placement, Shop

# The whole stack (redis, gunicorn instances, nginx) as one fixture.
pytest_plugins = ["tests.stack", "tests.mail_fixtures", "tests.cluster", "tests.saga_fixtures"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(directory=Path(tmp_path_factory.mktemp("redis")), port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def stack_kind(request: pytest.FixtureRequest) -> str:
    """``one-node`` unless the test is parametrized over the stacks (indirectly)."""
    return getattr(request, "param", ONE_NODE)


def _cluster_nodes(cluster: LocalCluster) -> list[tuple[str, int]]:
    return [("127.0.0.1", port) for port in cluster.ports[:3]]


@pytest.fixture
async def redis(request: pytest.FixtureRequest, stack_kind: str) -> AsyncIterator[Redis]:
    """A client on a flushed database: every test starts from an empty shop."""
    if stack_kind == CLUSTER:
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        # Right after the session's cluster formed a primary refuses writes
        # (NOREPLICAS) until its replica links: wait until every node takes them.
        assert await asyncio.to_thread(wait_ready, _cluster_nodes(cluster), 60.0) == 0
        client: Redis = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in _cluster_nodes(cluster)]
        )
        await client.initialize()
        # The whole shop is this test's (the audit counts every order of every shard).
        # The session's cluster is shared, but tests run one at a time and its other
        # users compare their own moves or keys, never the cluster's totals.
        await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        client = Redis.from_url(server.url)
        await client.flushall()
    # The app's chunk beliefs are process-wide and described the data just flushed: a
    # belief learnt from an earlier test would cost this test's first order a retry,
    # which the tests that count scripts run would see.
    HINTS.forget()
    STRIPE_HINTS.forget()  # the stripes it learnt of were flushed too
    yield client
    await client.aclose()


@pytest.fixture
def app_env(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, stack_kind: str
) -> dict[str, str]:
    env = {"ADMIN_TOKEN": ADMIN_TOKEN, "BENCH_ROUTES": "1"}
    if stack_kind == CLUSTER:
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        nodes = ",".join(f"{host}:{port}" for host, port in _cluster_nodes(cluster))
        # REDIS_URL gives the cluster only its password and TLS (none here).
        # The replica's WAIT gets 1.5 s here, not a shop's 500 ms: a suite's cluster shares
        # 2 cores with everything else, and a deposit once got 503 write_unconfirmed in a
        # fresh clone's make test. Tests of the timeout itself set their own.
        env |= {
            "REDIS_URL": "redis://127.0.0.1/0",
            "REDIS_CLUSTER_NODES": nodes,
            "REDIS_WAIT_MS": "1500",
        }
    else:
        env["REDIS_URL"] = request.getfixturevalue("redis_server").url
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
async def client(aiohttp_client: Any, app_env: dict[str, str], redis: Redis) -> TestClient:
    return await aiohttp_client(await create_app())


@pytest.fixture
def shop(client: TestClient) -> Shop:
    return Shop(client)


@pytest.fixture
def placement(request: pytest.FixtureRequest, stack_kind: str, redis: Redis) -> Placement:
    """Which primary serves a key (tests/helpers.py: Placement)."""
    cluster = request.getfixturevalue("redis_cluster") if stack_kind == CLUSTER else None
    return Placement(redis, cluster)
