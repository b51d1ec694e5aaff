"""The bench's data: customers and phones made through the admin API, and rows
bulk-loaded straight into Redis (``redis-cli --pipe``, with the key names and
hash fields of app/keys.py) for the list cost. Memory per order is measured on
orders the real scripts wrote (loadtests/order_memory.py)."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.request

from app import keys
from app.partitions import PARTITIONS, new_chunked_id, partition_of
from app.vocabulary import COMPLETED, ORDER_FIELDS, encode_items
from loadtests.stack import LoadStack


def admin(base: str, token: str, method: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def provision(stack: LoadStack, phones: int, customers: int) -> tuple[list[str], list[dict]]:
    base, token = stack.direct_url, stack.admin_token
    phone_ids = [
        admin(
            base,
            token,
            "POST",
            "/phones",
            {"name": f"Bench phone {i}", "price_cents": 100, "stock": 10**9},
        )["phone"]["id"]
        for i in range(phones)
    ]
    people = []
    for i in range(customers):
        created = admin(
            base,
            token,
            "POST",
            "/customers",
            {
                "name": "Bench",
                "surname": f"Customer {i}",
                "email": f"bench-{i}@example.com",
                "balance_cents": 10**12,
            },
        )
        people.append({"id": created["customer"]["id"], "token": created["token"]})
    return phone_ids, people


class ProtocolCommand:
    """A RESP command whose constant parts are encoded once: ``fill`` supplies the
    variable ones (None in the template), in order. Two million rows are encoded
    per bench run, and encoding every part each time took minutes."""

    def __init__(self, *parts: str | None) -> None:
        segments = [f"*{len(parts)}\r\n"]
        for part in parts:
            if part is None:
                segments.append("${}\r\n{}\r\n")
            else:
                encoded = f"${len(part)}\r\n{part}\r\n"
                segments.append(encoded.replace("{", "{{").replace("}", "}}"))
        self._format = "".join(segments).format

    def fill(self, *values: str) -> str:
        return self._format(*[item for value in values for item in (len(value), value)])


def _bulk_id(partition: int, kind: int, i: int) -> str:
    """A valid id (app/ids.py) in ``partition``: the partition byte, a kind byte, the number."""
    raw = bytes([partition, kind]) + i.to_bytes(14, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def bulk_load(
    stack: LoadStack, *, phones: int, orders: int, customer_id: str, phone_id: str, start: int
) -> float:
    """Add phones ``start..phones`` (spread over every partition) and orders
    ``start..orders`` (all the customer's, so in its partition) straight into Redis,
    with the keys and fields app/keys.py documents, through ``redis-cli --pipe``.
    Their ``seq`` follow the partition clocks' present values, which are then raised
    past them so scores stay unique within each partition."""
    began = time.monotonic()
    now = str(int(time.time() * 1000))
    base_seq = int(time.time() * 1_000_000)
    proc = subprocess.Popen(
        ["redis-cli", "-p", str(stack.redis_port), "--pipe"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdin is not None
    phone_hash = ProtocolCommand(
        "HSET",
        None,
        "id",
        None,
        "name",
        None,
        "description",
        "A phone bulk-loaded by the bench",
        "image_url",
        None,
        "price_cents",
        "19900",
        "stock",
        "100",
        "added_units",
        "100",
        "seq",
        None,
        "created_at",
        now,
    )
    index_entry = ProtocolCommand("ZADD", None, None, None)
    clock = ProtocolCommand("SET", None, None)
    chunk: list[str] = []
    for i in range(start, phones):
        partition = i % PARTITIONS
        pid = _bulk_id(partition, 1, i)
        seq = str(base_seq + i)
        chunk.append(
            phone_hash.fill(keys.phone(pid), pid, f"Bulk phone {i}", f"/img/bulk-{i}.png", seq)
        )
        chunk.append(index_entry.fill(keys.phones(partition), seq, pid))
        if len(chunk) >= 20_000:
            proc.stdin.write("".join(chunk))
            chunk.clear()
    for partition in range(PARTITIONS):
        chunk.append(clock.fill(keys.phones_seq(partition), str(base_seq + phones)))
    own = partition_of(customer_id)
    customer_completed = keys.customer_orders_by_status(customer_id, COMPLETED)
    name = ORDER_FIELDS  # the hash's stored field names
    order_hash = ProtocolCommand(
        "HSET",
        None,
        name["customer_id"],
        customer_id,
        name["status"],
        COMPLETED,
        name["items"],
        encode_items([(phone_id, 1, 100)]),
        name["total_cents"],
        "100",
        name["seq"],
        None,
        name["created_at"],
        now,
    )
    customer_index = ProtocolCommand("ZADD", customer_completed, None, None)
    # The partition's status list is in chunks of CHUNK_ORDERS (app/keys.py): the bulk
    # orders fill fresh chunks after the current one, with their directory entries,
    # counts and starts, and the state moves past them; each id names its chunk.
    state = keys.order_chunk_state(own)
    current = keys.order_clock_parts(stack.stack.redis.cli("GET", keys.orders_seq(own)).strip())
    first_chunk = current[1] + 1
    status_chunk = ProtocolCommand("ZADD", None, None, None)
    directory = ProtocolCommand("ZADD", keys.order_chunks(own, COMPLETED), None, None)
    counts = ProtocolCommand("HINCRBY", keys.order_chunk_counts(own, COMPLETED), None, None)
    start_of = ProtocolCommand("HSET", state, None, None)
    for n, i in enumerate(range(start, orders)):
        k = first_chunk + n // keys.CHUNK_ORDERS
        oid = new_chunked_id(own, k)
        seq = str(base_seq + i)
        chunk.append(order_hash.fill(keys.order(oid), seq))
        chunk.append(customer_index.fill(seq, oid))
        chunk.append(status_chunk.fill(keys.orders_by_status(own, COMPLETED, k), seq, oid))
        if n % keys.CHUNK_ORDERS == 0:
            chunk.append(directory.fill(seq, str(k)))
            chunk.append(start_of.fill(str(k), seq))
        chunk.append(counts.fill(str(k), "1"))
        chunk.append(counts.fill(f"g{k // keys.CHUNK_GROUP}", "1"))
        if len(chunk) >= 20_000:
            proc.stdin.write("".join(chunk))
            chunk.clear()
    # The order clock (app/keys.py: orders_seq) moves past them, and its chunk state past
    # their chunks.
    current_chunk, placed = current[1], current[2]
    if orders > start:
        current_chunk = first_chunk + (orders - start - 1) // keys.CHUNK_ORDERS + 1
        placed = 0
        # The admin lists' totals are the ledger's order counts (app/status_lists.py). Only
        # those: the bulk rows are not real orders (no debit), and the audit is not run.
        chunk.append(
            ProtocolCommand("HINCRBY", keys.ledger(own), f"orders_{COMPLETED}", None).fill(
                str(orders - start)
            )
        )
    chunk.append(
        clock.fill(keys.orders_seq(own), keys.order_clock(base_seq + orders, current_chunk, placed))
    )
    proc.stdin.write("".join(chunk))
    proc.stdin.close()
    output = proc.stdout.read() if proc.stdout else ""
    proc.wait(timeout=300)
    if "errors: 0" not in output:
        raise RuntimeError(f"redis-cli --pipe: {output}")
    return time.monotonic() - began
