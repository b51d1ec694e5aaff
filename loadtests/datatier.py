"""The data tier's own figures, without the app: ``python -m loadtests.datatier <what>``.

``ceiling``   today's ``app/lua/place_order.lua``, driven by redis-benchmark (one process
              per primary, EVALSHA), on a 1-primary and a 3-primary local cluster in the
              same run: orders/s and Redis CPU per order (``used_cpu_*`` deltas).
``failover``  kill -9 of the primary serving a key while a redis-py ``RedisCluster``
              caller runs a one-line script on it every 10 ms: seconds until a call
              succeeds again, the errors the caller saw, acknowledged writes lost.
``memory``    bytes per stored order and per Idempotency-Key record, today's layout
              against the per-partition layout of docs/data-tier.md section 10.

What ``ceiling`` is and is not: the script and its keys are the real ones (app/keys.py),
with the customer and the phone in one partition served by each primary (the
single-partition order). It measures how the per-script work scales with primaries;
the saga's reserve + commit will cost more per order. On a 2-core machine three primaries and their generators
share two cores, so the orders/s ratio cannot reach 3; the CPU per order can be compared.

Traffic goes only to 127.0.0.1, to servers this module starts on free ports in a temp
folder and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import json
import os
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster

from app import keys
from app.auth import new_token, token_sha256
from app.customers.service import create_customer_keys
from app.ops.redis_cluster import LocalCluster, Topology, client, free_ports, poll
from app.orders.idempotency import record_place
from app.orders.service import place_order_keys
from app.partitions import PARTITION_TAGS, PARTITIONS, partition_of, slot
from app.phones.service import create_phone_keys
from app.scripts import load_source
from app.vocabulary import COMPLETED, encode_items

MS_2026 = 1_764_600_000_000


def partition_for(view: Topology, port: int) -> int:
    """A partition whose slot the primary on ``port`` serves."""
    for partition in range(PARTITIONS):
        if view.primary_for_slot(slot(partition)).port == port:
            return partition
    raise RuntimeError(f"no partition on {port}")


def _seeded_ids(partition: int) -> tuple[str, str]:
    """The bench customer's and phone's ids in ``partition`` (fixed, so that
    _seed_partition and _benchmark_argv agree)."""
    customer_id = base64.urlsafe_b64encode(bytes([partition]) + b"c" * 15).decode().rstrip("=")
    phone_id = base64.urlsafe_b64encode(bytes([partition]) + b"p" * 15).decode().rstrip("=")
    return customer_id, phone_id


def cpu_seconds(port: int) -> float:
    with client(port) as node:
        info = node.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


# ---- ceiling ------------------------------------------------------------------------------


def _seed_partition(port: int, partition: int) -> tuple[str, str]:
    """One customer and one phone in ``partition``, created by the real scripts with the
    app's own key lists."""
    customer_id, phone_id = _seeded_ids(partition)
    token = new_token(partition)
    now = str(int(time.time() * 1000))
    with client(port) as node:
        node.eval(
            load_source("create_customer"),
            6,
            *create_customer_keys(customer_id, token, token_sha256(token)),
            customer_id,
            "Bench",
            "Mark",
            f"{partition}@example.com",
            f"{partition}@example.com",
            10**12,
            token_sha256(token),
            now,
        )
        node.eval(
            load_source("create_phone"),
            4,
            *create_phone_keys(phone_id),
            phone_id,
            "Pixel",
            "",
            "",
            49_900,
            10**9,
            now,
        )
        # Chunk 0 starts at seq 1 (its directory score) and never fills in this run.
        node.hset(keys.order_chunk_state(partition), "0", 1)
        node.set(keys.orders_seq(partition), keys.order_clock(0, 0, -(10**12)))
    return customer_id, phone_id


def _benchmark_argv(port: int, sha: str, partition: int, requests: int, clients: int) -> list[str]:
    customer_id, phone_id = _seeded_ids(partition)
    rand = "__rand_int__"  # redis-benchmark puts a fresh random number in each
    # A new order and Idempotency-Key record per call, in the customer's partition (the
    # order id's first two characters are the customer's, which carry its partition).
    # The id says chunk 0 ("AAAA", app/partitions.py: chunk_of); _seed_partition set the
    # partition's chunk state so that chunk 0 never fills in this run: one fixed command
    # cannot follow the chunks (the app does, from the answers).
    order_id = customer_id[:2] + "AAAA" + rand
    place = record_place(customer_id, "bench", 86_400, int(time.time()))
    script_keys = place_order_keys(customer_id, order_id, COMPLETED, place, [phone_id])
    # The record's field (16 bytes) then the fingerprint (12): a new field per call.
    request = f"{rand:>16}".replace(" ", "k") + "f" * 12
    args = [order_id, customer_id, str(int(time.time() * 1000)), "0" * 32, "1", "1", request]
    args += [str(place.expire_at), phone_id, "1"]
    return [
        "redis-benchmark",
        "-p", str(port),
        "-n", str(requests),
        "-c", str(clients),
        "-r", "1000000000",  # an int: larger overflows
        "--csv",
        "EVALSHA", sha, str(len(script_keys)), *script_keys, *args,
    ]  # fmt: skip


def run_ceiling(
    directory: Path, primaries: int, replicas: int, requests: int, clients: int, appendfsync: str
) -> dict[str, Any]:
    cluster = LocalCluster.on_free_ports(
        directory / f"p{primaries}",
        primaries=primaries,
        replicas=replicas,
        appendfsync=appendfsync,
    )
    cluster.start()
    try:
        view = cluster.topology()
        source = load_source("place_order")
        sha = hashlib.sha1(source.encode()).hexdigest()
        ports = sorted(p.port for p in view.primaries())
        partitions = {port: partition_for(view, port) for port in ports}
        for port in ports:
            with client(port) as node:
                assert node.script_load(source) == sha
            _seed_partition(port, partitions[port])
        all_ports = cluster.running()
        cpu_before = {port: cpu_seconds(port) for port in all_ports}
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        generators = [
            subprocess.Popen(
                _benchmark_argv(port, sha, partitions[port], requests, clients),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for port in ports
        ]
        outputs = [generator.communicate(timeout=600) for generator in generators]
        wall = time.perf_counter() - started
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_after = {port: cpu_seconds(port) for port in all_ports}
        for generator, (out, err) in zip(generators, outputs, strict=True):
            if generator.returncode != 0 or '"EVALSHA' not in out:
                raise RuntimeError(f"redis-benchmark failed: {out[-500:]} {err[-500:]}")
        placed = 0
        for port in ports:
            with client(port) as node:
                placed += node.zcard(keys.orders_by_status(partitions[port], COMPLETED, 0))
        primary_cpu = sum(cpu_after[p] - cpu_before[p] for p in ports)
        replica_cpu = sum(cpu_after[p] - cpu_before[p] for p in all_ports if p not in ports)
        generator_cpu = (children_after.ru_utime + children_after.ru_stime) - (
            children_before.ru_utime + children_before.ru_stime
        )
        return {
            "primaries": primaries,
            "replicas_per_primary": replicas,
            "appendfsync": appendfsync,
            "calls": requests * len(ports),
            "orders_placed": placed,
            "wall_s": round(wall, 2),
            "orders_per_s": round(placed / wall),
            "primary_cpu_us_per_order": round(primary_cpu / placed * 1e6, 1),
            "replica_cpu_us_per_order": round(replica_cpu / placed * 1e6, 1),
            "generator_cpu_s": round(generator_cpu, 2),
        }
    finally:
        cluster.stop()


# ---- failover ------------------------------------------------------------------------------

COUNT_SCRIPT = "return redis.call('HINCRBY', KEYS[1], 'n', 1)"


async def _failover_round(cluster: LocalCluster, key: str, timeout_s: float) -> dict[str, Any]:
    routed = RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", port) for port in cluster.ports],
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
    )
    try:
        await routed.initialize()
        script = routed.register_script(COUNT_SCRIPT)
        victim = routed.get_node_from_key(key).port
        errors: collections.Counter[str] = collections.Counter()
        last_acked = 0
        killed_at: float | None = None
        first_after: tuple[float, int] | None = None
        started = time.monotonic()
        while first_after is None and time.monotonic() - started < timeout_s:
            if killed_at is None and time.monotonic() - started > 0.5:
                cluster.kill(victim)
                killed_at = time.monotonic()
            try:
                value = int(await script(keys=[key]))
            except Exception as error:  # what a caller sees is the measurement
                errors[type(error).__name__] += 1
            else:
                if killed_at is None:
                    last_acked = value
                else:
                    first_after = (time.monotonic(), value)
            await asyncio.sleep(0.01)  # pacing the probe calls: the measurement's resolution
        if killed_at is None or first_after is None:
            raise RuntimeError(f"no successful call within {timeout_s}s of the kill")
        return {
            "killed_port": victim,
            "seconds_to_first_success": round(first_after[0] - killed_at, 2),
            "errors_seen": dict(errors),
            # Without WAIT a write acknowledged just before the kill may be missing.
            "acknowledged_writes_lost": max(0, last_acked - (first_after[1] - 1)),
        }
    finally:
        await routed.aclose()


def run_failover(directory: Path, rounds: int, node_timeout_ms: int) -> dict[str, Any]:
    cluster = LocalCluster.on_free_ports(directory / "failover", node_timeout_ms=node_timeout_ms)
    cluster.start()
    try:
        results = []
        for n in range(rounds):
            round_result = asyncio.run(_failover_round(cluster, f"failover:{{r{n}}}", 120))
            results.append(round_result)
            cluster.start_node(round_result["killed_port"])  # back, as a replica
            cluster.wait_healthy(120)
        times = [r["seconds_to_first_success"] for r in results]
        return {
            "node_timeout_ms": node_timeout_ms,
            "rounds": results,
            "seconds_min_median_max": [min(times), statistics.median(times), max(times)],
        }
    finally:
        cluster.stop()


# ---- memory ------------------------------------------------------------------------------


def _fill_today(node: Any, n_orders: int, customers: int) -> None:
    pipe = node.pipeline(transaction=False)
    for n in range(n_orders):
        order_id, customer_id = secrets.token_urlsafe(16), f"c{n % customers:021d}"
        pipe.hset(
            keys.order(order_id),
            mapping={
                "id": order_id,
                "customer_id": customer_id,
                "status": COMPLETED,
                "items": encode_items([(secrets.token_urlsafe(16), 1, 49_900)]),
                "total_cents": "49900",
                "seq": str(n),
                "created_at": str(MS_2026 + n),
                "request_id": secrets.token_hex(16),
            },
        )
        # Layout 4's all-orders indexes beside the status ones; app/keys.py names them no more.
        pipe.zadd(f"oa{{{PARTITION_TAGS[partition_of(order_id)]}}}", {order_id: n})
        pipe.zadd(f"os{{{PARTITION_TAGS[partition_of(order_id)]}}}{COMPLETED}", {order_id: n})
        pipe.zadd(f"co{{{PARTITION_TAGS[partition_of(customer_id)]}}}{customer_id}", {order_id: n})
        pipe.zadd(keys.customer_orders_by_status(customer_id, COMPLETED), {order_id: n})
        if n % 1000 == 999:
            pipe.execute()
    pipe.execute()


def _fill_lean(status_index: str) -> Any:
    """docs/data-tier.md section 10: order numbers per partition, short field names."""

    def fill(node: Any, n_orders: int, customers: int) -> None:
        pipe = node.pipeline(transaction=False)
        for n in range(n_orders):
            tag, number = f"{n % 128:03d}", n // 128 + 1
            customer = (n % customers) // 128
            pipe.hset(
                f"o{{{tag}}}{number}",
                mapping={
                    "c": customer,
                    "s": "c",
                    "i": encode_items([(str((n * 7) % 9000), 1, 49_900)]),
                    "t": 49_900,
                    "a": MS_2026 // 1000 + n,
                },
            )
            pipe.zadd(f"co{{{tag}}}{customer}", {number: number})
            pipe.zadd(f"co{{{tag}}}{customer}:c", {number: number})
            if status_index == "skiplist":
                pipe.zadd(f"os{{{tag}}}c", {number: number})
            elif status_index == "chunked":
                pipe.zadd(f"os{{{tag}}}c:{number // 128}", {number: number})
            if n % 1000 == 999:
                pipe.execute()
        pipe.execute()

    return fill


def _fill_design(node: Any, n_orders: int, customers: int) -> None:
    """docs/data-tier.md 2.2-2.3 as designed: the hash keyed by 8 bytes of the order id (the
    fence's test), indexes of those 8 bytes scored by the order number, chunked by 128."""
    pipe = node.pipeline(transaction=False)
    for n in range(n_orders):
        tag, number = f"{n % 128:03d}", n // 128 + 1
        customer = (n % customers) // 128
        r, z = secrets.token_bytes(8), secrets.token_bytes(7)
        pipe.hset(
            f"o{{{tag}}}".encode() + r,
            mapping={
                "c": customer,
                "s": "c",
                "i": encode_items([(str((n * 7) % 9000), 1, 49_900)]),
                "t": 49_900,
                "a": MS_2026 // 1000 + n,
                "n": number,
                "z": z,
            },
        )
        pipe.zadd(f"co{{{tag}}}{customer}", {r: number})
        pipe.zadd(f"co{{{tag}}}{customer}:c", {r: number})
        pipe.zadd(f"oa{{{tag}}}:{number // 128}", {r: number})
        pipe.zadd(f"os{{{tag}}}c:{number // 128}", {r: number})
        if n % 1000 == 999:
            pipe.execute()
    pipe.execute()


def _fill_idem_today(node: Any, n_records: int, _customers: int) -> None:
    pipe = node.pipeline(transaction=False)
    for n in range(n_records):
        body = json.dumps(
            {
                "id": secrets.token_urlsafe(16),
                "customer_id": secrets.token_urlsafe(16),
                "status": COMPLETED,
                "items": encode_items([(secrets.token_urlsafe(16), 1, 49_900)]),
                "total_cents": "49900",
                "seq": str(n),
                "created_at": str(MS_2026),
                "request_id": secrets.token_hex(16),
            },
            separators=(",", ":"),
        )
        # Layout 3's record: a hash per key, i{P}<customer id>:<sha256 of the key>.
        key = f"i{{{n % 128:03d}}}{secrets.token_urlsafe(16)}:{secrets.token_hex(32)}"
        pipe.hset(
            key, mapping={"fingerprint": secrets.token_hex(32), "status": "201", "payload": body}
        )
        pipe.expire(key, 86_400)
        if n % 1000 == 999:
            pipe.execute()
    pipe.execute()


def _fill_idem_string(node: Any, n_records: int, _customers: int) -> None:
    pipe = node.pipeline(transaction=False)
    for n in range(n_records):
        key = f"i{{{n % 128:03d}}}{n // 128}".encode() + secrets.token_bytes(16)
        pipe.set(key, secrets.token_bytes(16) + str(n).encode(), ex=86_400)
        if n % 1000 == 999:
            pipe.execute()
    pipe.execute()


def _fill_idem_buckets(node: Any, n_records: int, _customers: int) -> None:
    pipe = node.pipeline(transaction=False)
    for n in range(n_records):
        bucket = f"i{{{n % 128:03d}}}:490000"  # one hash per partition and hour
        pipe.hset(bucket, secrets.token_bytes(16), secrets.token_bytes(12) + str(n // 128).encode())
        if n % 1000 == 999:
            pipe.execute()
    for tag in range(128):
        pipe.expire(f"i{{{tag:03d}}}:490000", 90_000)
    pipe.execute()


LAYOUTS = [
    ("order: today's layout (hash + 4 zsets, 22-char ids)", _fill_today),
    ("order: per-partition hash + customer zsets", _fill_lean("none")),
    ("order: + partition status zset (skiplist)", _fill_lean("skiplist")),
    ("order: + partition status zset chunked by 128", _fill_lean("chunked")),
    ("order: as designed (8-byte id keys and members, all + status chunked)", _fill_design),
    ("Idempotency-Key: today (hash, full body, TTL)", _fill_idem_today),
    ("Idempotency-Key: a string per key, TTL", _fill_idem_string),
    ("Idempotency-Key: field of an hourly hash per partition", _fill_idem_buckets),
]


def standalone(directory: Path, port: int) -> subprocess.Popen:
    binary = shutil.which("redis-server") or "redis-server"
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", "redis.log"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def answers() -> bool:
        with client(port) as node:
            try:
                return bool(node.ping())
            except Exception:
                return False

    poll(answers, 30, f"redis-server on {port}")
    return proc


def run_memory(directory: Path, n_orders: int) -> dict[str, Any]:
    """Bytes per record of each layout, on one redis-server and on a 1-node cluster
    (cluster mode keeps per-slot key bookkeeping, which costs per key)."""
    customers = max(1, n_orders // 5)
    results: dict[str, Any] = {"orders": n_orders, "customers": customers, "bytes": {}}
    standalone_port = free_ports(1)[0]
    server = standalone(directory / "standalone", standalone_port)
    cluster = LocalCluster.on_free_ports(directory / "memory-cluster", primaries=1, replicas=0)
    try:
        cluster.start()
        for mode, port in (
            ("one redis-server", standalone_port),
            ("1-node cluster", cluster.ports[0]),
        ):
            with client(port, timeout=30) as node:
                for name, fill in LAYOUTS:
                    node.flushall()
                    base = int(node.info("memory")["used_memory"])
                    fill(node, n_orders, customers)
                    used = int(node.info("memory")["used_memory"]) - base
                    results["bytes"].setdefault(name, {})[mode] = round(used / n_orders, 1)
                node.flushall()
    finally:
        cluster.stop()
        server.send_signal(signal.SIGTERM)
        server.wait(10)
    return results


# ---- the CLI -------------------------------------------------------------------------------


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.datatier", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="what", required=True)
    ceiling = sub.add_parser("ceiling", help="place_order.lua on 1 vs 3 primaries")
    ceiling.add_argument("--requests", type=int, default=50_000, help="EVALSHA calls per primary")
    ceiling.add_argument(
        "--clients", type=int, default=50, help="redis-benchmark connections per primary"
    )
    ceiling.add_argument("--replicas", type=int, default=0, choices=(0, 1))
    ceiling.add_argument("--appendfsync", default="always", choices=("always", "everysec"))
    failover = sub.add_parser("failover", help="seconds until a script call succeeds after kill -9")
    failover.add_argument("--rounds", type=int, default=3)
    failover.add_argument("--node-timeout-ms", type=int, default=2000)
    memory = sub.add_parser("memory", help="bytes per order and per Idempotency-Key record")
    memory.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if shutil.which("redis-benchmark") is None:
        raise SystemExit("redis-benchmark is missing (it comes with redis-server; make setup)")

    with tempfile.TemporaryDirectory(prefix="datatier-") as tmp:
        directory = Path(tmp)
        if args.what == "ceiling":
            rows = [
                run_ceiling(
                    directory,
                    primaries,
                    args.replicas,
                    args.requests,
                    args.clients,
                    args.appendfsync,
                )
                for primaries in (1, 3)
            ]
            one, three = rows
            result: Any = {
                "machine_cpus": os.cpu_count(),
                "runs": rows,
                "orders_per_s_ratio_3_to_1": round(three["orders_per_s"] / one["orders_per_s"], 2),
                "primary_cpu_per_order_ratio_3_to_1": round(
                    three["primary_cpu_us_per_order"] / one["primary_cpu_us_per_order"], 2
                ),
            }
            print(_table(rows, list(rows[0])))
            print(
                f"\n3 primaries / 1 primary: orders/s x{result['orders_per_s_ratio_3_to_1']}, "
                f"Redis CPU per order x{result['primary_cpu_per_order_ratio_3_to_1']} "
                f"({result['machine_cpus']} CPUs on this machine)"
            )
        elif args.what == "failover":
            result = run_failover(directory, args.rounds, args.node_timeout_ms)
            print(_table(result["rounds"], list(result["rounds"][0])))
            low, mid, high = result["seconds_min_median_max"]
            print(
                f"\nfirst success after kill -9: {low}/{mid}/{high} s (min/median/max), node timeout {args.node_timeout_ms} ms"
            )
        else:
            result = run_memory(directory, args.orders)
            rows = [{"layout": name, **modes} for name, modes in result["bytes"].items()]
            print(_table(rows, ["layout", "one redis-server", "1-node cluster"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
