"""The saga's order on 1 and on 3 primaries in one run: Redis CPU per order summed over the
primaries, and orders/s: ``python -m loadtests.saga_shards [--orders N] [--inflight K]``.

Each shard count gets a local cluster of its own (no replicas, AOF ``always``, on free
ports in a temp folder, stopped afterwards), seeded with 128 phones (one per partition)
and 256 customers. Each order is the saga's three steps as app/orders/saga_service.py
runs them, through the app's cluster gateway: ``reserve_stock`` on the phone's partition,
``commit_order`` on the customer's, then the settle handed to a Settler (batched per
partition every 50 ms). The phone and the customer are in different partitions, so on 3
primaries most orders span two of them. The commit appends its events to the
customer's partition stream (``keys.events``, section 7 of docs/data-tier.md), as the app's.

Figures per shard count: script calls per order (the primaries' EVALSHA counts), Redis
CPU per order (``used_cpu_sys + used_cpu_user`` deltas summed over the primaries), the
scripts' own time per order (EVALSHA usec in INFO commandstats) and orders/s; then the 3-to-1 ratios (issue 11 asks CPU per order within 1.3x).

Traffic goes only to 127.0.0.1, to servers this module starts and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster

from app import keys, partitions
from app.cluster_gateway import open_cluster_gateway
from app.ops.redis_cluster import LocalCluster, client
from app.orders import saga
from app.orders.saga_service import commit_order_keys
from app.orders.settler import Settler
from app.scripts import Scripts
from app.vocabulary import COMPLETED, encode_items

CUSTOMERS = 256


def _primary_stats(ports: list[int]) -> tuple[float, int, int]:
    """Used CPU seconds, EVALSHA calls and their usec (the scripts alone), summed over
    the nodes."""
    cpu, calls, usec = 0.0, 0, 0
    for port in ports:
        with client(port) as node:
            info = node.info("cpu")
            stats = node.info("commandstats").get("cmdstat_evalsha", {})
        cpu += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        calls += int(stats.get("calls", 0))
        usec += int(stats.get("usec", 0))
    return cpu, calls, usec


async def _seed(redis: RedisCluster) -> tuple[list[str], list[str]]:
    phones = [partitions.new_id(p) for p in range(partitions.PARTITIONS)]
    # Customers in other partitions than their phones (see _line).
    customers = [partitions.new_id(c % partitions.PARTITIONS) for c in range(CUSTOMERS)]
    for phone_id in phones:
        await redis.hset(
            keys.phone(phone_id),
            mapping={"id": phone_id, "price_cents": 1000, "stock": 10**9, "added_units": 10**9},
        )
    for customer_id in customers:
        await redis.hset(
            keys.customer(customer_id),
            mapping={"id": customer_id, "balance_cents": 10**13, "added_cents": 10**13},
        )
    return phones, customers


async def _one_shard_count(
    primaries: int, orders: int, inflight: int, directory: Path
) -> dict[str, Any]:
    cluster = LocalCluster.on_free_ports(directory, primaries, replicas=0)
    cluster.start()
    seeds = tuple(("127.0.0.1", port) for port in cluster.ports)
    redis = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in seeds], decode_responses=True
    )
    gateway = open_cluster_gateway(
        "redis://127.0.0.1",
        seeds,
        replicas=0,
        wait_ms=1000,
        socket_timeout=10.0,
        max_connections=inflight * 4,
    )
    scripts = Scripts(gateway)
    settler = Settler(gateway, scripts)
    try:
        await redis.initialize()
        phones, customers = await _seed(redis)
        await scripts.load()

        async def order(i: int) -> None:
            customer_id = customers[i % len(customers)]
            # A phone of another partition than the customer's: the cross-partition order.
            phone_id = phones[(partitions.partition_of(customer_id) + 1 + i % 97) % len(phones)]
            phone_partition = partitions.partition_of(phone_id)
            order_partition = partitions.partition_of(customer_id)
            order_id = partitions.new_id(order_partition)
            reserved = await saga.reserve(
                scripts,
                order_id,
                phone_partition,
                [(phone_id, 1)],
                int(time.time() * 1000) + 10_000,
            )
            lines = reserved.payload["lines"]
            script_keys = commit_order_keys(customer_id, order_id, COMPLETED, None)
            committed = await scripts.call(
                "commit_order",
                script_keys,
                [
                    order_id,
                    customer_id,
                    int(time.time() * 1000),
                    f"shards-{i}",
                    "1",
                    "0",
                    "-",
                    86400,
                    encode_items([(phone_id, 1, 1000)]),
                ],
            )
            assert committed.status == 201, committed.payload
            settler.settle_soon(phone_partition, order_id, saga.COMMITTED, lines)

        ports = cluster.ports
        cpu_before, calls_before, usec_before = _primary_stats(ports)
        started = time.perf_counter()
        queue = iter(range(orders))

        async def worker() -> None:
            for i in queue:
                await order(i)

        await asyncio.gather(*(worker() for _ in range(inflight)))
        await settler.drain()
        elapsed = time.perf_counter() - started
        cpu_after, calls_after, usec_after = _primary_stats(ports)
        return {
            "primaries": primaries,
            "orders": orders,
            "script_calls_per_order": round((calls_after - calls_before) / orders, 2),
            "redis_cpu_us_per_order": round((cpu_after - cpu_before) * 1e6 / orders, 1),
            "script_us_per_order": round((usec_after - usec_before) / orders, 1),
            "orders_per_s": round(orders / elapsed),
        }
    finally:
        await gateway.aclose()
        await redis.aclose()
        cluster.stop()


async def run(orders: int, inflight: int, directory: Path) -> list[dict[str, Any]]:
    one = await _one_shard_count(1, orders, inflight, directory / "one")
    three = await _one_shard_count(3, orders, inflight, directory / "three")
    return [
        one,
        three,
        {
            "cpu_per_order_3_to_1": round(
                three["redis_cpu_us_per_order"] / one["redis_cpu_us_per_order"], 2
            ),
            "orders_per_s_3_to_1": round(three["orders_per_s"] / one["orders_per_s"], 2),
        },
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=10_000)
    parser.add_argument("--inflight", type=int, default=32)
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="saga-shards-") as directory:
        results = asyncio.run(run(options.orders, options.inflight, Path(directory)))
    for row in results:
        print(json.dumps(row))
    print(json.dumps({"load_average_1m": round(os.getloadavg()[0], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
