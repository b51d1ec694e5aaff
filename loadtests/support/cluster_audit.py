"""app/admin/audit.py's audit over every primary of a local Redis Cluster, from outside the
app: what make bench's data-tier section (loadtests/bench_tier.py) runs after each replay
and the reshard test (tests/test_cluster_reshard.py) at rest."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisError

from app.admin.audit import run_audit
from app.partitions import PARTITIONS

# Tries of the audit (it only reads), and its connections per primary.
AUDIT_ATTEMPTS = 3
AUDIT_CONNECTIONS = 2 * PARTITIONS


async def audit(ports: Iterable[int]) -> dict[str, Any]:
    """app/admin/audit.py's audit over every primary of the cluster on ``ports``. It reads
    every partition at once (128 calls in flight on one node), so each primary's
    connections are opened first, one after the other: opened all at once, redis-py once
    failed one of them mid-connect (AttributeError: its writer None) and left its socket
    open. It only reads, so a failure of the client is tried again (twice at most)."""
    nodes = [ClusterNode("127.0.0.1", port) for port in ports]
    for attempt in range(AUDIT_ATTEMPTS):
        cluster = RedisCluster(startup_nodes=nodes, max_connections=AUDIT_CONNECTIONS)
        try:
            await cluster.initialize()
            for node in cluster.get_primaries():
                await _connected(node, PARTITIONS)
            return await run_audit(cluster)
        except (RedisError, OSError, AttributeError) as error:
            if attempt + 1 == AUDIT_ATTEMPTS:
                raise
            print(
                f"cluster_audit: the audit failed ({error!r}); again", file=sys.stderr, flush=True
            )
        finally:
            await cluster.aclose()
    raise AssertionError("unreachable")


async def _connected(node: ClusterNode, count: int) -> None:
    """``count`` connections of ``node`` opened one after the other, left free in its pool."""
    held = [node.acquire_connection() for _ in range(count)]
    try:
        for connection in held:
            await connection.connect()
    finally:
        for connection in held:
            node.release(connection)
