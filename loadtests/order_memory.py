"""Redis memory per stored order and per Idempotency-Key record, as the real scripts
store them: ``python -m loadtests.order_memory --orders 1000000`` (issue 17).

Customers (5 orders each), one phone per partition and the orders are written by
create_customer.lua, create_phone.lua and place_order.lua with the app's own KEYS and
ARGV (app/customers, app/phones, app/orders/service.py), pipelined per node, every
order with an Idempotency-Key. Each customer orders the phone of its own partition, so
place_order runs as one script on one slot on the cluster too. Measured on one
redis-server and on a 3-primary cluster (no replicas), each at two sizes (a tenth of
the orders, then all of them), so a per-order figure that is flat shows the
extrapolation to larger counts holds:

- ``order_hash_bytes``: MEMORY USAGE (SAMPLES 0: exact) of 2,000 order hashes;
- ``index_share_bytes``: every partition's status chunks with their directories, counts
  and chunk state (layout 7: app/keys.py), summed and divided by the
  orders; the customers' status zsets, over 2,000 customers, divided by their orders
  (layout 5 has no all-orders indexes: app/keys.py);
- ``bytes_per_order``: the hash plus those shares (issue 17's measure);
- ``used_memory_per_order``: the servers' ``used_memory`` growth over the orders, less
  the Idempotency-Key buckets and the event streams: what MEMORY USAGE does not see
  (the cluster's per-key slot bookkeeping, the keyspace's hash table);
- ``idempotency_record_bytes``: the buckets' MEMORY USAGE over their records;
- ``event_entry_bytes``: the streams' MEMORY USAGE per order (2 entries each, until
  they are trimmed).

Traffic goes only to 127.0.0.1, to servers this module starts on free ports in a temp
folder and stops.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from app import keys
from app.auth import new_token, token_sha256
from app.customers.service import create_customer_keys
from app.ops.redis_cluster import LocalCluster, free_ports
from app.orders.service import idempotency_request, place_order_keys
from app.partitions import PARTITIONS, new_id, partition_for_email, partition_of, slot
from app.phones.service import create_phone_keys
from app.scripts import load_source
from app.vocabulary import COMPLETED, ORDER_STATUSES, new_order_id
from loadtests.datatier import standalone
from loadtests.support.cli import measurement_parser, publish

ORDERS_PER_CUSTOMER = 5
TIERS = ("one redis-server", "3-primary cluster")
# make bench's size per tier (loadtests/bench.py --memory-orders): issue 17 states its
# target at 1M orders, so the bench measures there (and at a tenth of it), about 4.5
# minutes for both tiers; --memory-orders 200000 takes about one.
BENCH_ORDERS = 1_000_000
CLI_ORDERS = 1_000_000
SAMPLE = 2_000
BATCH = 2_000
IDEMPOTENCY_TTL_S = 86_400


class Tier:
    """The nodes of one store, and which serves each partition."""

    def __init__(self, node_of_partition: dict[int, int]) -> None:
        self.node_of = node_of_partition
        self.clients = {
            port: redis.Redis(host="127.0.0.1", port=port, socket_timeout=120)
            for port in set(node_of_partition.values())
        }
        self.shas: dict[str, str] = {}

    def load(self, names: list[str]) -> None:
        for name in names:
            source = load_source(name)
            self.shas[name] = hashlib.sha1(source.encode()).hexdigest()
            for client in self.clients.values():
                client.script_load(source)

    def used_memory(self) -> int:
        return sum(int(c.info("memory")["used_memory"]) for c in self.clients.values())

    def run(self, calls: list[tuple[int, str, list[str], list[Any]]]) -> list[Any]:
        """EVALSHA each (partition, script, keys, args), pipelined per node."""
        by_node: dict[int, list[int]] = defaultdict(list)
        for i, (partition, _, _, _) in enumerate(calls):
            by_node[self.node_of[partition]].append(i)
        replies: list[Any] = [None] * len(calls)
        for port, indexes in by_node.items():
            with self.clients[port].pipeline(transaction=False) as pipe:
                for i in indexes:
                    _, name, script_keys, args = calls[i]
                    pipe.evalsha(self.shas[name], len(script_keys), *script_keys, *args)
                for i, reply in zip(indexes, pipe.execute(), strict=True):
                    replies[i] = reply
        return replies

    def memory_usage(self, partition: int, key: str) -> int:
        return int(self.clients[self.node_of[partition]].memory_usage(key, samples=0) or 0)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


Call = tuple[int, str, list[str], list[Any]]  # partition, script, KEYS, ARGV


def _in_batches(tier: Tier, start: int, stop: int, make: Callable[[int], Call]) -> None:
    """Calls ``make(start..stop-1)``, run BATCH at a time; any refusal stops the fill."""
    for first in range(start, stop, BATCH):
        calls = [make(i) for i in range(first, min(stop, first + BATCH))]
        for reply in tier.run(calls):
            if int(reply[0]) >= 300:
                raise RuntimeError(f"{calls[0][1]} answered {reply}")


def fill_and_measure(tier: Tier, orders: int, sizes: list[int]) -> list[dict[str, Any]]:
    now = int(time.time() * 1000)
    tier.load(["create_phone", "create_customer", "place_order"])
    phones = [new_id(p) for p in range(PARTITIONS)]
    _in_batches(
        tier,
        0,
        PARTITIONS,
        lambda p: (
            p,
            "create_phone",
            create_phone_keys(phones[p]),
            [phones[p], "Pixel", "", "", 49_900, 10**12, now],
        ),
    )
    customers: list[str] = []

    def customer(i: int) -> Call:
        email = f"memory-{i}@example.com"
        partition = partition_for_email(email)
        customer_id = new_id(partition)
        customers.append(customer_id)
        token = new_token(partition)
        digest = token_sha256(token)
        return (
            partition,
            "create_customer",
            create_customer_keys(customer_id, token, digest),
            [customer_id, "Mem", "Ory", email, email, 10**12, digest, now],
        )

    _in_batches(tier, 0, -(-orders // ORDERS_PER_CUSTOMER), customer)
    base = tier.used_memory()
    sampled_orders: list[str] = []
    sample_every = max(1, orders // SAMPLE)

    # The one writer, in order: the n-th order of a partition goes into its chunk
    # n // CHUNK_ORDERS (app/keys.py), which its id must name.
    placed_in: list[int] = [0] * PARTITIONS

    def order(j: int) -> Call:
        customer_id = customers[j // ORDERS_PER_CUSTOMER]
        partition = partition_of(customer_id)
        order_id = new_order_id(customer_id, placed_in[partition] // keys.CHUNK_ORDERS)
        placed_in[partition] += 1
        if j % sample_every == 0:
            sampled_orders.append(order_id)
        lines = [(phones[partition], 1)]
        record, idempotency = idempotency_request(
            customer_id, lines, True, f"memory-{j}", IDEMPOTENCY_TTL_S
        )
        script_keys = place_order_keys(
            customer_id, order_id, COMPLETED, record, [phones[partition]]
        )
        # nginx's $request_id: 32 hex characters (the events keep it).
        args = [order_id, customer_id, now + j, secrets.token_hex(16), "1", *idempotency]
        return partition, "place_order", script_keys, [*args, phones[partition], 1]

    results = []
    placed = 0
    for size in sizes:
        began = time.monotonic()
        _in_batches(tier, placed, size, order)
        placed = size
        results.append(
            {
                "orders": size,
                "fill_s": round(time.monotonic() - began, 1),
                **measure(tier, size, base, sampled_orders, customers),
            }
        )
    return results


def measure(
    tier: Tier, orders: int, base: int, sampled: list[str], customers: list[str]
) -> dict[str, Any]:
    hashes = [tier.memory_usage(partition_of(o), keys.order(o)) for o in sampled]
    # The status chunks with their directories and counts, and the chunk state.
    partition_indexes = sum(
        tier.memory_usage(p, keys.order_chunk_state(p)) for p in range(PARTITIONS)
    )
    for p in range(PARTITIONS):
        client = tier.clients[tier.node_of[p]]
        for s in ORDER_STATUSES:
            directory = keys.order_chunks(p, s)
            chunks = [int(k) for k in client.zrange(directory, 0, -1)]
            partition_indexes += tier.memory_usage(p, directory)
            partition_indexes += tier.memory_usage(p, keys.order_chunk_counts(p, s))
            partition_indexes += sum(
                tier.memory_usage(p, keys.orders_by_status(p, s, k)) for k in chunks
            )
    with_orders = customers[: -(-orders // ORDERS_PER_CUSTOMER)]
    chosen = random.Random(17).sample(with_orders, min(SAMPLE, len(with_orders)))
    customer_bytes = customer_orders = 0
    for c in chosen:
        p = partition_of(c)
        for s in ORDER_STATUSES:
            index = keys.customer_orders_by_status(c, s)
            customer_bytes += tier.memory_usage(p, index)
            customer_orders += int(tier.clients[tier.node_of[p]].zcard(index))
    buckets = records = 0
    for client in tier.clients.values():
        for key in client.scan_iter(match=keys.IDEMPOTENCY_MATCH, count=1000):
            buckets += int(client.memory_usage(key, samples=0) or 0)
            records += int(client.hlen(key))
    streams = sum(tier.memory_usage(p, keys.events(p)) for p in range(PARTITIONS))
    order_hash = sum(hashes) / len(hashes)
    shares = {
        "status zsets of the partitions": partition_indexes / orders,
        "a customer's status zsets": customer_bytes / customer_orders,
    }
    grown = tier.used_memory() - base
    return {
        "order_hash_bytes": round(order_hash, 1),
        "index_share_bytes": {k: round(v, 1) for k, v in shares.items()},
        "bytes_per_order": round(order_hash + sum(shares.values()), 1),
        "used_memory_per_order": round((grown - buckets - streams) / orders, 1),
        "idempotency_record_bytes": round(buckets / records, 1),
        "idempotency_records": records,
        "event_entry_bytes": round(streams / orders, 1),
    }


def run(directory: Path, orders: int) -> dict[str, Any]:
    """Both tiers, each at a tenth of ``orders`` and at ``orders``."""
    sizes = [max(1, orders // 10), orders]
    result: dict[str, Any] = {"orders": orders, "orders_per_customer": ORDERS_PER_CUSTOMER}
    port = free_ports(1)[0]
    server = standalone(directory / "standalone", port)
    tier = Tier(dict.fromkeys(range(PARTITIONS), port))
    try:
        result["one redis-server"] = fill_and_measure(tier, orders, sizes)
    finally:
        tier.close()
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    cluster = LocalCluster.on_free_ports(directory / "cluster", primaries=3, replicas=0)
    cluster.start()
    try:
        view = cluster.topology()
        tier = Tier({p: view.primary_for_slot(slot(p)).port for p in range(PARTITIONS)})
        try:
            result["3-primary cluster"] = fill_and_measure(tier, orders, sizes)
        finally:
            tier.close()
    finally:
        cluster.stop()
    return result


def bench_figures(result: dict[str, Any]) -> dict[str, Any]:
    """make bench's memory figures: one redis-server's at the larger size under the
    names the report reads, and every tier and size as measured."""
    largest = result["one redis-server"][-1]
    return {
        "bytes_per_order": largest["bytes_per_order"],
        "order_hash_bytes": largest["order_hash_bytes"],
        "index_share_bytes": largest["index_share_bytes"],
        "idempotency_hash_bytes": largest["idempotency_record_bytes"],
        "event_entry_bytes": largest["event_entry_bytes"],
        "tiers": {tier: result[tier] for tier in TIERS},
    }


def main(argv: list[str] | None = None) -> int:
    parser = measurement_parser("order_memory", __doc__)
    parser.add_argument("--orders", type=int, default=CLI_ORDERS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="order-memory-") as tmp:
        result = run(Path(tmp), args.orders)
    return publish(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
