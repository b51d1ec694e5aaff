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

# Tries of the audit (it only reads).
AUDIT_ATTEMPTS = 3


async def audit(ports: Iterable[int]) -> dict[str, Any]:
    """app/admin/audit.py's audit over every primary of the cluster on ``ports``, by a fresh
    client. The audit itself bounds its reads in flight (LEDGER_CALLS), so the client opens
    few connections. It only reads, so a failure of the client is tried again (twice at
    most)."""
    nodes = [ClusterNode("127.0.0.1", port) for port in ports]
    for attempt in range(AUDIT_ATTEMPTS):
        cluster = RedisCluster(startup_nodes=nodes)
        try:
            await cluster.initialize()
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
