"""The audit at size and under writes, on a fresh redis-server of its own.

Fills Redis with ``--orders`` orders through the real place_order script, then
runs the audit (app/admin/audit.py, as GET /admin/audit does) while a writer
places orders at ``--rate`` per second, and reports:

- how long the audit took and what it concluded;
- the writer's achieved rate during the audit;
- the longest any single command kept Redis busy meanwhile (SLOWLOG, every
  command of 1 ms or more, from any client), and the worst PING round trip a
  separate client saw.

    python -m loadtests.audit_load --orders 1000000 --rate 2000

Everything runs on 127.0.0.1 and stops on its own: the writer stops with the
audit, and the audit with --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis as sync_redis
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app import keys
from app.admin.audit import run_audit
from app.auth import new_token, token_sha256
from app.customers.service import create_customer_keys
from app.orders.service import place_order_keys
from app.partitions import PARTITIONS, partition_of
from app.phones.service import create_phone_keys
from app.scripts import load_source
from app.vocabulary import COMPLETED, OPEN, new_customer_id, new_order_id, new_phone_id
from loadtests.support.servers import free_port

PHONES = 100
CUSTOMERS = 100


def start_redis(directory: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        cwd=directory,
        stdout=subprocess.DEVNULL,
    )
    client = sync_redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except sync_redis.ConnectionError:
            if time.monotonic() > deadline:
                server.kill()
                raise
            time.sleep(0.05)  # polling for the server to accept
    client.close()
    return server, port


class Shop:
    """Calls the real scripts with the keys app/*/service.py builds."""

    def __init__(self, redis: Redis, *, all_completed: bool = False) -> None:
        self.redis = redis
        # The audit wants open and completed orders; the mail bench only completed ones.
        self.all_completed = all_completed
        self.shas: dict[str, str] = {}
        self.phones: list[str] = []
        self.customers: list[str] = []
        self.placed = 0
        self.chunks = [0] * PARTITIONS  # each partition's current chunk, as last answered

    async def load(self) -> None:
        for name in ("create_phone", "create_customer", "place_order"):
            self.shas[name] = await self.redis.script_load(load_source(name))

    async def create(self) -> None:
        now = int(time.time() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for _ in range(PHONES):
                phone_id = new_phone_id()
                self.phones.append(phone_id)
                pipe.evalsha(
                    self.shas["create_phone"],
                    4,
                    *create_phone_keys(phone_id),
                    phone_id,
                    "P",
                    "",
                    "",
                    100,
                    10**9,
                    now,
                )
            for i in range(CUSTOMERS):
                email = f"c{i}@example.com"
                customer_id = new_customer_id(email)
                token = new_token(partition_of(customer_id))
                digest = token_sha256(token)
                self.customers.append(customer_id)
                pipe.evalsha(
                    self.shas["create_customer"],
                    6,
                    *create_customer_keys(customer_id, token, digest),
                    customer_id,
                    "A",
                    "B",
                    email,
                    email,
                    10**12,
                    digest,
                    now,
                )
            await pipe.execute()

    async def place(self, count: int) -> None:
        """``count`` orders in one pipeline, half completed at once. Each id is minted
        for its partition's current chunk as the last answers said (app/keys.py); those
        a script refused as stale (another pipeline moved the chunk on) go again, as the
        app's do."""
        wanted = []
        for _ in range(count):
            i = self.placed
            self.placed += 1
            completed = self.all_completed or i % 2 == 1
            wanted.append((self.customers[i % CUSTOMERS], self.phones[i % PHONES], completed))
        while wanted:
            wanted = await self._place_once(wanted)

    async def _place_once(self, wanted: list[tuple[str, str, bool]]) -> list[tuple[str, str, bool]]:
        now = int(time.time() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for customer_id, phone_id, completed in wanted:
                order_id = new_order_id(customer_id, self.chunks[partition_of(customer_id)])
                status = COMPLETED if completed else OPEN
                script_keys = place_order_keys(customer_id, order_id, status, None, [phone_id])
                pipe.evalsha(
                    self.shas["place_order"],
                    len(script_keys),
                    *script_keys,
                    order_id,
                    customer_id,
                    now,
                    "audit-load",
                    "1" if completed else "0",
                    "0",
                    "",
                    60,
                    phone_id,
                    1,
                )
            replies = await pipe.execute()
        again = []
        for one, reply in zip(wanted, replies, strict=True):
            answer = json.loads(reply[1])
            partition = partition_of(one[0])
            if answer.get("code") == "order_chunk_stale":
                self.chunks[partition] = int(answer["chunk"])
                again.append(one)
            elif int(reply[0]) != 201:
                raise RuntimeError(f"place_order refused: {reply}")
            else:
                self.chunks[partition] = int(answer["current_chunk"])
        return again


async def fill(shop: Shop, orders: int) -> float:
    started = time.monotonic()
    while shop.placed < orders:
        await asyncio.gather(*(shop.place(min(1000, orders - shop.placed)) for _ in range(2)))
        # The stream is the mail worker's, trimmed by it in production; here
        # nobody reads it, and it is not part of the audit.
        async with shop.redis.pipeline(transaction=False) as pipe:
            for partition in range(PARTITIONS):
                pipe.xtrim(keys.events(partition), maxlen=1_000, approximate=True)
            await pipe.execute()
        if shop.placed % 100_000 < 2000:
            print(f"  {shop.placed:,} orders", file=sys.stderr, flush=True)
    return time.monotonic() - started


async def write_at(
    shop: Shop, rate: float, stop: asyncio.Event, tick: float = 0.01
) -> tuple[int, float]:
    """Place ``rate`` orders a second in ``tick`` second ticks until ``stop``."""
    started, placed = time.monotonic(), 0
    while not stop.is_set():
        due = int((time.monotonic() - started) * rate) - placed
        if due > 0:
            await shop.place(due)
            placed += due
        await asyncio.sleep(tick)  # pacing the writer, not synchronising
    return placed, time.monotonic() - started


def ping_probe(port: int, stop: threading.Event, worst: list[float]) -> None:
    client = sync_redis.Redis(port=port)
    while not stop.is_set():
        began = time.perf_counter()
        client.ping()
        worst[0] = max(worst[0], time.perf_counter() - began)
        time.sleep(0.001)  # pacing the probe
    client.close()


async def measure(
    port: int,
    orders: int,
    rate: int,
    audit_limit: float,
    audit: Callable[[Redis], Awaitable[Any]] = run_audit,
) -> dict[str, Any]:
    # No silent retries (a resent pipeline would place its orders twice), and
    # room for a box so busy that Redis is descheduled for seconds.
    options: dict[str, Any] = {"retry": Retry(NoBackoff(), 0), "socket_timeout": 120}
    redis = Redis(port=port, **options)
    writer_redis = Redis(port=port, **options)
    try:
        shop = Shop(redis)
        await shop.load()
        await shop.create()
        fill_seconds = await fill(shop, orders)
        writer_shop = Shop(writer_redis)
        writer_shop.shas, writer_shop.phones, writer_shop.customers = (
            shop.shas,
            shop.phones,
            shop.customers,
        )
        await redis.config_set("slowlog-log-slower-than", 1000)  # microseconds
        await redis.slowlog_reset()
        await redis.config_resetstat()
        stop, probe_stop, worst = asyncio.Event(), threading.Event(), [0.0]
        probe = threading.Thread(target=ping_probe, args=(port, probe_stop, worst))
        probe.start()
        writer = asyncio.create_task(write_at(writer_shop, rate, stop)) if rate else None
        started = time.monotonic()
        error = None
        try:
            answer = await asyncio.wait_for(audit(redis), audit_limit)
        except Exception as failure:  # the old audit's 503, a time-out: reported
            answer, error = None, f"{type(failure).__name__}: {failure}"
        seconds = time.monotonic() - started
        stop.set()
        placed, writer_seconds = await writer if writer else (0, seconds)
        probe_stop.set()
        probe.join()
        slow = await redis.slowlog_get(128)
        stats = await redis.info("commandstats")
    finally:
        await redis.aclose()
        await writer_redis.aclose()
    summary = None
    if isinstance(answer, dict):
        summary = {name: answer.get(name) for name in ("ok", "at_rest", "writes_during", "orders")}
        summary["checks"] = {c["name"]: c["ok"] for c in answer.get("checks", [])}
    return {
        "orders_before": orders,
        "fill_seconds": round(fill_seconds, 1),
        "audit_seconds": round(seconds, 2),
        "audit_error": error,
        "audit": summary,
        "writer_orders_per_second": round(placed / writer_seconds) if writer_seconds else 0,
        "commands_over_1ms": len(slow),
        # Longest single command per name (SLOWLOG's wall time: on a busy box
        # it includes the time the server was descheduled mid-command).
        "longest_ms_by_command": {
            name: max(e["duration"] for e in slow if _name(e) == name) / 1000
            for name in sorted({_name(e) for e in slow})
        },
        "worst_ping_ms": round(worst[0] * 1000, 2),
        # Redis's own accounting of the time spent in each command meanwhile (EXEC
        # includes the commands it ran; EVALSHA the scripts', the audit's
        # read_rows alone when --rate is 0).
        "commandstats": {
            name.removeprefix("cmdstat_"): {
                "calls": row["calls"],
                "usec_per_call": row["usec_per_call"],
                "usec": row["usec"],
            }
            for name, row in stats.items()
            if name.removeprefix("cmdstat_")
            in ("evalsha", "exec", "hmget", "zrange", "zrangebyscore")
        },
    }


# EVALSHA entries named by their script: the audit's reads vs the writer's orders.
_SCRIPT_NAMES = {
    hashlib.sha1(load_source(name).encode()).hexdigest(): name
    for name in ("read_rows", "place_order", "create_phone", "create_customer")
}


def _name(entry: dict[str, Any]) -> str:
    words = entry["command"].decode(errors="replace").split(" ")
    if words[0].upper() == "EVALSHA" and len(words) > 1:
        return f"EVALSHA {_SCRIPT_NAMES.get(words[1], words[1][:8])}"
    return words[0].upper()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=1_000_000)
    parser.add_argument("--rate", type=int, default=2000, help="orders/s placed during the audit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the audit may take")
    options = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="audit-load-"))
    server, port = start_redis(directory)
    try:
        result = asyncio.run(measure(port, options.orders, options.rate, options.timeout))
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0 if result["audit_error"] is None and result["audit"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
