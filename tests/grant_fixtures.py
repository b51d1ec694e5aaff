"""Helpers of the grant tests (tests/test_grants.py, tests/test_grant_crash.py) on the
real 3+3 cluster: where each primary's stripe host is, customers on another primary than
a phone's, and a phone's figures once nothing of it is held (docs/escrow.md, section 8)."""

from __future__ import annotations

import itertools
import time
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app import keys, partitions
from app.ops.poll import wait_until_async
from app.ops.redis_cluster import LocalCluster

REST_S = 60


def port_of(view: Any, partition: int) -> int:
    return view.primary_for_slot(partitions.slot(partition)).port


def host_by_port(cluster: LocalCluster) -> dict[int, int]:
    """Each primary's host partition (the lowest it serves), by the primary's port: the
    topology's own view, beside the app's (redis-py's slot map)."""
    view = cluster.topology()
    hosts: dict[int, int] = {}
    for partition in range(partitions.PARTITIONS):
        hosts.setdefault(port_of(view, partition), partition)
    return hosts


def customer_email(cluster: LocalCluster, avoid_port: int, hosts: set[int]) -> str:
    """A fresh email whose customer's partition is on another primary than ``avoid_port``
    and is no stripe host (so grant ids and order ids never share a partition here)."""
    view = cluster.topology()
    for n in itertools.count():
        email = f"grants-{time.time_ns()}-{n}@example.com"
        partition = partitions.partition_for_email(email)
        port = view.primary_for_slot(partitions.slot(partition)).port
        if port != avoid_port and partition not in hosts:
            return email
    raise AssertionError("unreachable")


async def phone_at_rest(
    redis: Redis | RedisCluster, phone_id: str, hosts: list[int]
) -> dict[str, int]:
    """Once nothing of the phone is held: the pool's figures and the stripes' sums; the
    identities of docs/escrow.md section 8 must hold then."""

    async def figures() -> dict[str, int] | None:
        row = await redis.hmget(
            keys.phone(phone_id), "stock", "held", "sold", "lent", "added_units"
        )
        stock, held, sold, lent, added = (int(v or 0) for v in row)
        if held:
            return None
        got = 0
        for host in hosts:
            stripe = await redis.hmget(keys.stripe(host, phone_id), "stock", "sold", "got")
            s_stock, s_sold, s_got = (int(v or 0) for v in stripe)
            assert s_stock + s_sold == s_got
            got += s_got
        return {"stock": stock, "sold": sold, "lent": lent, "added": added, "got": got}

    found = await wait_until_async(figures, "nothing of the phone held", REST_S)
    assert found["stock"] + found["sold"] + found["lent"] == found["added"]
    assert found["lent"] == found["got"]
    return found
