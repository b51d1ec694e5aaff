"""What the reservation saga costs Redis per order on one redis-server, against today's
``place_order.lua``: ``python -m loadtests.saga_cost [--orders N] [--inflight K]``.

One redis-server (AOF, ``appendfsync always``, as ``make run``) on a free port in a temp
folder, seeded with customers and phones; then, each phase on its own with
``CONFIG RESETSTAT`` before it, one-line orders through the app's own gateway (the
multiplexed connection) with K calls in flight:

``place_order``   today's order: one script call per order;
``saga order``    the same order by the saga's order path (app/orders/saga_service.py),
                  split (``always_split``: on one node it collapses into place_order):
                  reserve, commit, then the settle it hands the settler after the
                  answer (one call per phone partition every 50 ms);
``reserve``       the saga's try on the phone's partition alone (reserve_stock.lua);
``settle``        confirming those reservations alone (settle_reservation.lua, committed);
``fence+settle``  what the settler spends on an order a dead app left: the fence on the
                  order's partition, then the release (reserve + fence + settle aborted).

Per phase: script calls per order, Redis CPU per order (``used_cpu_sys + used_cpu_user``
deltas of the server: scripts, network reads and writes, the AOF), and the scripts' own
time per call (INFO commandstats, EVALSHA's usec).

Traffic goes only to 127.0.0.1, to the server this module starts and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis

from app import keys, partitions
from app.orders import saga, saga_service
from app.orders.service import place_order
from app.orders.settler import Settler
from app.redis_gateway import open_gateway
from app.scripts import Scripts
from app.vocabulary import new_order_id
from loadtests.support.servers import RedisServer, free_port

PHONES = 64
CUSTOMERS = 256
LATER_MS = 10**13


def _cpu_and_script_time(info: dict[str, Any], stats: dict[str, Any]) -> tuple[float, int, int]:
    evalsha = stats.get("cmdstat_evalsha", {})
    return (
        float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
        int(evalsha.get("calls", 0)),
        int(evalsha.get("usec", 0)),
    )


async def _measure(
    redis: Redis,
    name: str,
    orders: int,
    inflight: int,
    one: Callable[[int], Awaitable[None]],
    then: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """Run ``one(i)`` for every order, K at a time, then ``then()`` (work an order left
    running after its answer); the script calls are the server's count."""
    await redis.config_resetstat()
    cpu_before = _cpu_and_script_time(await redis.info("cpu"), {})[0]
    started = time.perf_counter()
    queue = iter(range(orders))

    async def worker() -> None:
        for i in queue:
            await one(i)

    await asyncio.gather(*(worker() for _ in range(inflight)))
    if then is not None:
        await then()
    elapsed = time.perf_counter() - started
    cpu_after, evalsha_calls, evalsha_usec = _cpu_and_script_time(
        await redis.info("cpu"), await redis.info("commandstats")
    )
    return {
        "phase": name,
        "orders": orders,
        "script_calls_per_order": round(evalsha_calls / orders, 2),
        "redis_cpu_us_per_order": round((cpu_after - cpu_before) * 1e6 / orders, 1),
        "script_us_per_call": round(evalsha_usec / max(evalsha_calls, 1), 2),
        "orders_per_s": round(orders / elapsed),
    }


async def _seed(redis: Redis) -> tuple[list[str], list[str]]:
    """Customers and phones as their hashes, rich enough for every order of the run."""
    phones = [partitions.new_id(p % partitions.PARTITIONS) for p in range(PHONES)]
    customers = [partitions.new_id(c % partitions.PARTITIONS) for c in range(CUSTOMERS)]
    async with redis.pipeline(transaction=False) as pipe:
        for phone_id in phones:
            pipe.hset(
                keys.phone(phone_id),
                mapping={
                    "id": phone_id,
                    "price_cents": 1000,
                    "stock": 10**9,
                    "added_units": 10**9,
                },
            )
        for customer_id in customers:
            pipe.hset(
                keys.customer(customer_id),
                mapping={"id": customer_id, "balance_cents": 10**13, "added_cents": 10**13},
            )
        await pipe.execute()
    return phones, customers


async def run(orders: int, inflight: int, directory: Path) -> list[dict[str, Any]]:
    server = RedisServer(directory=directory, port=free_port())
    server.start()
    pool = BlockingConnectionPool.from_url(server.url, max_connections=inflight + 4)
    redis = Redis(connection_pool=pool)
    gateway = open_gateway(pool, timeout=10.0)
    scripts = Scripts(gateway)
    try:
        phones, customers = await _seed(redis)
        await scripts.load()  # no NOSCRIPT round inside a measured phase

        def line(i: int) -> tuple[str, str, int]:
            """Order i's customer, its one phone and that phone's partition."""
            phone_id = phones[i % len(phones)]
            return customers[i % len(customers)], phone_id, partitions.partition_of(phone_id)

        async def today(i: int) -> None:
            customer_id, phone_id, _ = line(i)
            await place_order(
                scripts,
                order_id=new_order_id(customer_id, 0),
                customer_id=customer_id,
                lines=[(phone_id, 1)],
                autocheck=True,
                idempotency_key=None,
                idempotency_ttl=86400,
                request_id=f"cost-{i}",
            )

        settler = Settler(gateway, scripts)

        async def by_saga(i: int) -> None:
            customer_id, phone_id, _ = line(i)
            await saga_service.place_order(
                scripts,
                settler.settle_soon,
                customer_id=customer_id,
                lines=[(phone_id, 1)],
                autocheck=True,
                idempotency_key=None,
                idempotency_ttl=86400,
                request_id=f"cost-{i}",
                reservation_ttl_ms=10_000,
                always_split=True,  # one redis-server would collapse it into place_order
            )

        order_ids = [
            partitions.new_id(partitions.partition_of(line(i)[0])) for i in range(orders * 2)
        ]
        reserved: dict[int, str] = {}

        async def reserve(i: int) -> None:
            _, phone_id, partition = line(i)
            result = await saga.reserve(scripts, order_ids[i], partition, [(phone_id, 1)], LATER_MS)
            reserved[i] = result.payload["lines"]

        async def settle(i: int) -> None:
            _, _, partition = line(i)
            await saga.settle(scripts, partition, order_ids[i], saga.COMMITTED, reserved[i])

        async def swept(i: int) -> None:
            """A dead app's order, finished by the settler: reserve, fence, release."""
            j = orders + i
            _, phone_id, partition = line(j)
            result = await saga.reserve(scripts, order_ids[j], partition, [(phone_id, 1)], LATER_MS)
            [outcome] = await saga.fence(
                scripts, partitions.partition_of(order_ids[j]), [order_ids[j]]
            )
            await saga.settle(scripts, partition, order_ids[j], outcome, result.payload["lines"])

        results = [
            await _measure(redis, "place_order (today)", orders, inflight, today),
            await _measure(
                redis,
                "saga order (reserve, commit, settles batched per partition every 50 ms)",
                orders,
                inflight,
                by_saga,
                settler.drain,
            ),
            await _measure(redis, "reserve_stock alone", orders, inflight, reserve),
            await _measure(redis, "settle_reservation alone (committed)", orders, inflight, settle),
            await _measure(redis, "reserve + fence + settle (aborted)", orders, inflight, swept),
        ]
        results[1]["ratio_to_today"] = round(
            results[1]["redis_cpu_us_per_order"] / results[0]["redis_cpu_us_per_order"], 2
        )
        return results
    finally:
        await gateway.aclose()
        await redis.aclose()
        await pool.aclose()  # the client does not close a pool it was given
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=20_000)
    parser.add_argument("--inflight", type=int, default=16)
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="saga-cost-") as directory:
        results = asyncio.run(run(options.orders, options.inflight, Path(directory)))
    load = os.getloadavg()[0]
    for row in results:
        print(json.dumps(row))
    print(json.dumps({"load_average_1m": round(load, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
