"""What one script call costs through each of the app's Redis gateways:
``python -m loadtests.gateway_cost [--calls N] [--inflight K]``.

Three gateways, each against servers this module starts on free ports in a temp folder
(AOF, ``appendfsync always``, as ``make run``) and stops:

``one node``           one redis-server through the multiplexed connection
                       (app/fastredis.py): make run's default, no WAIT;
``cluster``            a 3 primaries + 3 replicas cluster (min-replicas-to-write 1)
                       through app/cluster_gateway.py with REDIS_WAIT_REPLICAS=0: the
                       library's routed EVALSHA only;
``cluster + WAIT 1``   the same with REDIS_WAIT_REPLICAS=1: [EVALSHA, WAIT 1] on one
                       connection of the key's primary (the acknowledged write of
                       docs/data-tier.md, section 6).

Each runs N calls of a one-key script (HINCRBY) with K in flight, on keys spread over
the 128 partitions (so over the three primaries). Per call: this process's CPU (the
app's side: client library, parsing, routing), wall time, and the Redis CPU of every
server (``used_cpu_sys + used_cpu_user`` deltas, replicas included). Traffic goes only
to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from redis.asyncio import BlockingConnectionPool

from app import partitions
from app.cluster_gateway import open_cluster_gateway
from app.ops.redis_cluster import LocalCluster
from app.redis_gateway import LuaScript, RedisGateway, open_gateway
from loadtests.support.servers import RedisServer, free_port

SCRIPT = LuaScript.of("cost", "return redis.call('HINCRBY', KEYS[1], 'n', 1)")
TIMEOUT = 5.0


def redis_cpu(ports: list[int]) -> float:
    """Seconds of CPU the servers on ``ports`` have used, together."""
    total = 0.0
    for port in ports:
        with redis.Redis(port=port, socket_timeout=TIMEOUT) as node:
            info = node.info("cpu")
        total += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return total


async def drive(
    gateway: RedisGateway, calls: int, inflight: int, prefix: str = "cost"
) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) for ``calls`` script calls, K at a time,
    on one counter per partition named ``prefix{tag}`` (one more call warms up the first)."""
    keys = [f"{prefix}{{{partitions.tag(p)}}}" for p in range(partitions.PARTITIONS)]
    await gateway.run_script(SCRIPT, [keys[0]], [])  # loaded, and connections open

    async def worker(first: int) -> None:
        for i in range(first, calls, inflight):
            await gateway.run_script(SCRIPT, [keys[i % len(keys)]], [])

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(k) for k in range(inflight)))
    return time.perf_counter() - wall, time.process_time() - cpu


async def measure(
    name: str,
    gateway: RedisGateway,
    ports: list[int],
    calls: int,
    inflight: int,
    prefix: str = "cost",
) -> dict[str, Any]:
    try:
        before = redis_cpu(ports)
        wall, cpu = await drive(gateway, calls, inflight, prefix)
        server_cpu = redis_cpu(ports) - before
    finally:
        await gateway.aclose()
    return {
        "gateway": name,
        "calls": calls,
        "inflight": inflight,
        "calls_per_s": round(calls / wall),
        "app_cpu_us_per_call": round(cpu / calls * 1e6, 1),
        "redis_cpu_us_per_call": round(server_cpu / calls * 1e6, 1),
    }


async def run(directory: Path, calls: int, inflight: int) -> list[dict[str, Any]]:
    results = []
    server = RedisServer(directory=directory / "single", port=free_port())
    server.start()
    try:
        pool = BlockingConnectionPool.from_url(server.url, timeout=TIMEOUT, max_connections=64)
        gateway = open_gateway(pool, TIMEOUT)
        results.append(await measure("one node", gateway, [server.port], calls, inflight))
        await pool.aclose()
    finally:
        server.stop()
    cluster = LocalCluster.on_free_ports(directory / "cluster", 3, 1)
    cluster.start()
    try:
        nodes = tuple(("127.0.0.1", port) for port in cluster.ports[:3])
        for name, replicas in (("cluster", 0), ("cluster + WAIT 1", 1)):
            gateway = open_cluster_gateway(
                "redis://127.0.0.1/0", nodes, replicas, 1000, TIMEOUT, 64
            )
            results.append(await measure(name, gateway, cluster.ports, calls, inflight))
    finally:
        cluster.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.gateway_cost", description=__doc__)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--inflight", type=int, default=16)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gateway-cost-") as directory:
        results = asyncio.run(run(Path(directory), args.calls, args.inflight))
    base = results[0]["app_cpu_us_per_call"]
    for row in results:
        row["app_cpu_vs_one_node"] = round(row["app_cpu_us_per_call"] / base, 2)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
