"""What escrow would cost Redis per order (docs/escrow.md): ``python -m loadtests.escrow_probe
[--orders N] [--rounds R] [--inflight K] [--share S]``.

One redis-server (AOF, ``appendfsync always``, as ``make run``) on a free 127.0.0.1 port
in a temp folder, seeded with customers, phones and stripes; then ``--rounds`` rounds, each
running every phase below once with ``--orders`` operations (K in flight, the app's own
gateway and multiplexed connection), the phases' order rotated from round to round so
that drift on the shared box hits them alike. Per phase and round: Redis CPU per operation
(the server's ``used_cpu_sys + used_cpu_user`` delta: scripts, socket reads and writes, the
AOF write and fsync), script calls per operation (EVALSHA's count) and the scripts' own
time per call (INFO commandstats); per phase the median over the rounds.

``place_order``              today's order on one node: app/lua/place_order.lua through
                             app/orders/service.py (the 1-primary tier's every order);
``place_order, cluster form``  the same script in its across_slots form (app/lua_prelude.py),
                             the phone's keys undeclared and touched first: a 3-primary
                             tier's collapsed order (customer and phone on one primary);
``split saga``               reserve + commit + the settles batched per phone partition
                             every 50 ms (app/orders/saga_service.py, always split): a
                             3-primary tier's order whose customer and phone are apart;
``stripe hit``               the prototype loadtests/escrow_lua/order_from_stripe.lua: the
                             commit's work, with the units taken from the phone's stripe
                             in the customer's own partition (every key declared);
``stripe hit, cluster form`` the same with the stripe in another partition of the same
                             node (across_slots: the stripe and its ledger undeclared),
                             escrow's order where customer and phone are apart;
``stripe miss``              the prototype against a phone without a stripe there: it
                             answers stripe_short with nothing written (what a stale hint
                             costs before the saga runs);
``refill``                   one refill of REFILL_UNITS units: reserve_stock.lua on the
                             phone's partition with a grant id, the prototype
                             loadtests/escrow_lua/receive_grant.lua on the stripe's, and
                             settle_reservation.lua (one call per refill, not batched).

From the medians it predicts, for 3 primaries against 1 with random placement (a third
of the orders collapse), issue 11's (a) Redis CPU per order and (b) the ceiling,
against a 1-primary cluster as bench_tier measures it (every order collapsed, in the
cluster form),
(b) = 1 / ((a) x the busiest primary's share), for a range of stripe hit ratios and
refill sizes. The predictions are arithmetic on this one-node run, not a cluster run.

Traffic goes only to 127.0.0.1, to the server this module starts and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.crc import key_slot

from app import keys, partitions
from app.lua_prelude import across_slots, with_prelude
from app.orders import saga, saga_service
from app.orders.chunk_hints import HINTS
from app.orders.service import (
    chunk_entry_keys,
    new_order_keys,
    older_buckets,
    place_order,
    place_order_keys,
)
from app.orders.settler import Settler
from app.redis_gateway import LuaScript, RedisGateway, open_gateway
from app.scripts import Scripts, load_across_slots_source
from app.vocabulary import COMPLETED, new_order_id
from loadtests.support.servers import RedisServer, free_port

PHONES = 64
CUSTOMERS = 256
PRICE_CENTS = 1000
PLENTY = 10**9
REFILL_UNITS = 16
LATER_MS = 10**13
# A third of the orders collapse on 3 primaries with random placement (bench_tier measured
# 0.33 collapsed place_order calls per order); the rest are split, or stripe orders.
COLLAPSED_SHARE = 1 / 3
# The busiest of 3 primaries' share of the tier's CPU (bench_tier: 0.31-0.35).
BUSIEST_SHARE = 0.34
HIT_RATIOS = (0.0, 0.5, 0.8, 0.9, 0.95, 1.0)
# Orders served per refill: 16 and 64 on demand, none per order when stripes are granted
# at restock time (0 here: no refill counted against the orders).
REFILL_EVERY = (16, 64, 0)
# bench_tier's (a) for today's tier, the middle of its measured 1.27-1.38 (docs/BENCH.md).
BENCH_TODAY_A = 1.32
LUA = Path(__file__).parent / "escrow_lua"
PHASES = (
    "place_order",
    "place_order, cluster form",
    "split saga",
    "stripe hit",
    "stripe hit, cluster form",
    "stripe miss",
    "refill",
)


# ---- prototype keys (the build adds them to app/keys.py; docs/escrow.md, step 1) --------


def stripe(partition: int, phone_id: str) -> str:
    """Hash in stripe host partition ``partition``: its quota of the phone (price_cents,
    gen, stock, sold, got)."""
    return f"sq{{{partitions.tag(partition)}}}{phone_id}"


def grant_receipts(partition: int) -> str:
    """Hash in a stripe host partition: grant id -> units received (the fence's test)."""
    return f"gr{{{partitions.tag(partition)}}}"


def _prototype(name: str) -> str:
    return (LUA / f"{name}.lua").read_text()


ORDER_FROM_STRIPE = LuaScript.of("order_from_stripe", with_prelude(_prototype("order_from_stripe")))
ORDER_FROM_STRIPE_ACROSS = LuaScript.of(
    "order_from_stripe", across_slots(_prototype("order_from_stripe"))
)
RECEIVE_GRANT = LuaScript.of("receive_grant", with_prelude(_prototype("receive_grant")))
PLACE_ORDER_ACROSS = LuaScript.of("place_order", load_across_slots_source("place_order"))


def _now_ms() -> int:
    return int(time.time() * 1000)


def host_of(customer_id: str, apart: bool) -> int:
    """The stripe host partition an order of this customer uses: its own, or (the cluster
    form) another partition, which on one redis-server is on the same node as every one."""
    own = partitions.partition_of(customer_id)
    return (own + partitions.PARTITIONS // 2) % partitions.PARTITIONS if apart else own


async def run_across_slots(
    gateway: RedisGateway, script: LuaScript, script_keys: list[str], args: list[Any]
) -> Any:
    """As app/cluster_gateway.py: run_on_one_node sends it: the first key's slot's keys
    declared, the rest first in ARGV."""
    slot = key_slot(script_keys[0].encode())
    declared = 1
    while declared < len(script_keys) and key_slot(script_keys[declared].encode()) == slot:
        declared += 1
    undeclared = script_keys[declared:]
    return await gateway.run_script(
        script, script_keys[:declared], [len(undeclared), *undeclared, *args]
    )


async def placed(customer_id: str, call: Callable[[str], Awaitable[Any]]) -> dict[str, Any]:
    """``call(order_id)`` with an id minted for the customer's partition's current chunk,
    minted again for the chunk a stale refusal names; the payload of the last answer."""
    partition = partitions.partition_of(customer_id)
    for _ in range(4):
        reply = await call(new_order_id(customer_id, HINTS.current(partition)))
        payload = json.loads(reply[1])
        if payload.get("code") != "order_chunk_stale":
            if "current_chunk" in payload:
                HINTS.learn(partition, int(payload["current_chunk"]))
            return {**payload, "http": int(reply[0])}
        HINTS.learn(partition, int(payload["chunk"]))
    raise RuntimeError("the chunk moved on four times")


def _server_figures(info: dict[str, Any], stats: dict[str, Any]) -> tuple[float, int, int]:
    evalsha = stats.get("cmdstat_evalsha", {})
    return (
        float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
        int(evalsha.get("calls", 0)),
        int(evalsha.get("usec", 0)),
    )


async def _figures(redis: Redis) -> tuple[float, int, int]:
    return _server_figures(await redis.info("cpu"), await redis.info("commandstats"))


async def _measure(
    redis: Redis,
    operations: int,
    inflight: int,
    one: Callable[[int], Awaitable[None]],
    then: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, float]:
    """``one(i)`` for i in 0..operations-1, K at a time, then ``then()``."""
    cpu_before, calls_before, usec_before = await _figures(redis)
    queue = iter(range(operations))

    async def worker() -> None:
        for i in queue:
            await one(i)

    await asyncio.gather(*(worker() for _ in range(inflight)))
    if then is not None:
        await then()
    cpu_after, calls_after, usec_after = await _figures(redis)
    calls = calls_after - calls_before
    return {
        "redis_cpu_us": (cpu_after - cpu_before) * 1e6 / operations,
        "script_calls": calls / operations,
        "script_us_per_call": (usec_after - usec_before) / max(calls, 1),
    }


async def _seed(redis: Redis) -> tuple[list[str], list[str], list[str]]:
    """Customers in every partition, phones in random ones, and a plentiful stripe of
    every phone in every partition (both host choices of host_of); the unstriped phones
    of the miss phase have none."""
    phones = [partitions.new_id(p % partitions.PARTITIONS) for p in range(PHONES)]
    bare = [partitions.new_id((p * 7) % partitions.PARTITIONS) for p in range(PHONES)]
    customers = [partitions.new_id(c % partitions.PARTITIONS) for c in range(CUSTOMERS)]
    async with redis.pipeline(transaction=False) as pipe:
        for phone_id in [*phones, *bare]:
            pipe.hset(
                keys.phone(phone_id),
                mapping={"price_cents": PRICE_CENTS, "stock": PLENTY, "added_units": PLENTY},
            )
        for customer_id in customers:
            pipe.hset(
                keys.customer(customer_id),
                mapping={"balance_cents": 10**15, "added_cents": 10**15},
            )
        for partition in range(partitions.PARTITIONS):
            for phone_id in phones:
                pipe.hset(
                    stripe(partition, phone_id),
                    mapping={"price_cents": PRICE_CENTS, "gen": 0, "stock": PLENTY, "got": PLENTY},
                )
        await pipe.execute()
    return phones, bare, customers


def predictions(
    medians: dict[str, float], share: float, bench_today: float = BENCH_TODAY_A
) -> list[dict[str, Any]]:
    """Issue 11's (a) and (b), 3 primaries against 1 primary, from the one-node figures: on
    1 primary every order collapses, on 3 a third do (place_order's cluster form); of the rest, ``hit`` take one stripe
    order (its cluster form) and the others the split saga; every ``k`` stripe orders
    cost one refill (k = 0: stripes granted at restock time, no refill per order).

    ``a_bench``: the same with the split saga's cost taken from what bench_tier measured
    for today's tier (``bench_today``, its (a) with no stripes) instead of from this run:
    its replays pipeline every call, which makes a call's fixed cost smaller than here."""
    # The 1-primary tier is a cluster too (bench_tier): its every order is collapsed, in
    # the across_slots form; so is a third of the 3-primary tier's.
    collapsed = medians["place_order, cluster form"]
    one = collapsed
    split = medians["split saga"]
    hit = medians["stripe hit, cluster form"]
    refill = medians["refill"]
    rows = []
    # The split saga's cost per order that makes this model give bench_tier's (a) today.
    split_bench = (bench_today * one - COLLAPSED_SHARE * collapsed) / (1 - COLLAPSED_SHARE)
    today = (COLLAPSED_SHARE * collapsed + (1 - COLLAPSED_SHARE) * split) / one
    rows.append(
        {
            "case": "today (no stripes)",
            "a": round(today, 3),
            "b": round(1 / (today * share), 2),
            "a_bench": bench_today,
            "b_bench": round(1 / (bench_today * share), 2),
        }
    )
    for k in REFILL_EVERY:
        for h in HIT_RATIOS:
            per_hit = hit + (refill / k if k else 0.0)
            apart = h * per_hit + (1 - h) * split
            a = (COLLAPSED_SHARE * collapsed + (1 - COLLAPSED_SHARE) * apart) / one
            apart_bench = h * per_hit + (1 - h) * split_bench
            a_bench = (COLLAPSED_SHARE * collapsed + (1 - COLLAPSED_SHARE) * apart_bench) / one
            rows.append(
                {
                    "case": f"stripes, hit ratio {h}, refill every {k or 'restock'}",
                    "a": round(a, 3),
                    "b": round(1 / (a * share), 2),
                    "a_bench": round(a_bench, 3),
                    "b_bench": round(1 / (a_bench * share), 2),
                }
            )
    miss = medians["stripe miss"]
    worst = (COLLAPSED_SHARE * collapsed + (1 - COLLAPSED_SHARE) * (split + miss)) / one
    worst_bench = (COLLAPSED_SHARE * collapsed + (1 - COLLAPSED_SHARE) * (split_bench + miss)) / one
    rows.append(
        {
            "case": "stripes that never hit, every apart order probing one first",
            "a": round(worst, 3),
            "b": round(1 / (worst * share), 2),
            "a_bench": round(worst_bench, 3),
            "b_bench": round(1 / (worst_bench * share), 2),
        }
    )
    return rows


async def run(
    orders: int,
    rounds: int,
    inflight: int,
    directory: Path,
    share: float = BUSIEST_SHARE,
    bench_today: float = BENCH_TODAY_A,
) -> dict[str, Any]:
    server = RedisServer(directory=directory, port=free_port())
    server.start()
    pool = BlockingConnectionPool.from_url(server.url, max_connections=inflight + 4)
    redis = Redis(connection_pool=pool)
    gateway = open_gateway(pool, timeout=10.0)
    scripts = Scripts(gateway)
    HINTS.forget()  # a fresh server's chunks start at 0
    try:
        phones, bare, customers = await _seed(redis)
        await scripts.load()
        for script in (
            ORDER_FROM_STRIPE,
            ORDER_FROM_STRIPE_ACROSS,
            RECEIVE_GRANT,
            PLACE_ORDER_ACROSS,
        ):
            await gateway.execute("SCRIPT", "LOAD", script.source)
        settler = Settler(gateway, scripts)
        counts = {"stripe_units_sold": 0, "stripe_misses": 0, "refilled_units": 0}

        def line(i: int) -> tuple[str, str]:
            return customers[i % len(customers)], phones[(i * 5) % len(phones)]

        async def today(i: int) -> None:
            customer_id, phone_id = line(i)
            await place_order(
                scripts,
                order_id=new_order_id(
                    customer_id, HINTS.current(partitions.partition_of(customer_id))
                ),
                customer_id=customer_id,
                lines=[(phone_id, 1)],
                autocheck=True,
                idempotency_key=None,
                idempotency_ttl=86400,
                request_id=f"probe-{i}",
            )

        async def collapsed_cluster_form(i: int) -> None:
            customer_id, phone_id = line(i)

            def call(order_id: str) -> Awaitable[Any]:
                script_keys = place_order_keys(customer_id, order_id, COMPLETED, None, [phone_id])
                args = [order_id, customer_id, _now_ms(), f"probe-{i}", "1", "0", b"", 0]
                return run_across_slots(
                    gateway, PLACE_ORDER_ACROSS, script_keys, [*args, phone_id, 1]
                )

            answer = await placed(customer_id, call)
            assert answer["http"] == 201, answer

        async def by_saga(i: int) -> None:
            customer_id, phone_id = line(i)
            await saga_service.place_order(
                scripts,
                settler.settle_soon,
                customer_id=customer_id,
                lines=[(phone_id, 1)],
                autocheck=True,
                idempotency_key=None,
                idempotency_ttl=86400,
                request_id=f"probe-{i}",
                reservation_ttl_ms=60_000,
                always_split=True,
            )

        def from_stripe(apart: bool, phone_of: Callable[[int], str], expect: int):
            async def one(i: int) -> None:
                customer_id, _ = line(i)
                phone_id = phone_of(i)
                host = host_of(customer_id, apart)
                partition = partitions.partition_of(customer_id)

                def call(order_id: str) -> Awaitable[Any]:
                    chunk = partitions.chunk_of(order_id)
                    script_keys = [
                        *new_order_keys(customer_id, order_id, COMPLETED, None, chunk),
                        *chunk_entry_keys(partition, COMPLETED, chunk),
                        keys.aborts(partition),
                        stripe(host, phone_id),
                        keys.ledger(host),
                        *older_buckets(customer_id, None),
                    ]
                    args = [order_id, customer_id, _now_ms(), f"probe-{i}", "1", "0", b"", 0]
                    args += [host, phone_id, 1]
                    if apart:
                        return run_across_slots(
                            gateway, ORDER_FROM_STRIPE_ACROSS, script_keys, args
                        )
                    return gateway.run_script(ORDER_FROM_STRIPE, script_keys, args)

                answer = await placed(customer_id, call)
                assert answer["http"] == expect, answer
                if expect == 201:
                    counts["stripe_units_sold"] += 1
                else:
                    assert answer["code"] == "stripe_short", answer
                    counts["stripe_misses"] += 1

            return one

        async def refill(i: int) -> None:
            customer_id, phone_id = line(i)
            host = host_of(customer_id, True)
            grant_id = partitions.new_id(host)
            phone_partition = partitions.partition_of(phone_id)
            reserved = await saga.reserve(
                scripts, grant_id, phone_partition, [(phone_id, REFILL_UNITS)], LATER_MS
            )
            assert reserved.status == 200, reserved
            received = await gateway.run_script(
                RECEIVE_GRANT,
                [
                    stripe(host, phone_id),
                    keys.ledger(host),
                    grant_receipts(host),
                    keys.aborts(host),
                ],
                [grant_id, REFILL_UNITS, PRICE_CENTS, 0],
            )
            assert int(received[0]) == 200, received
            await saga.settle(
                scripts, phone_partition, grant_id, saga.COMMITTED, reserved.payload["lines"]
            )
            counts["refilled_units"] += REFILL_UNITS

        steps: dict[str, tuple[Callable[[int], Awaitable[None]], Any]] = {
            "place_order": (today, None),
            "place_order, cluster form": (collapsed_cluster_form, None),
            "split saga": (by_saga, settler.drain),
            "stripe hit": (from_stripe(False, lambda i: line(i)[1], 201), None),
            "stripe hit, cluster form": (from_stripe(True, lambda i: line(i)[1], 201), None),
            "stripe miss": (from_stripe(False, lambda i: bare[i % len(bare)], 409), None),
            "refill": (refill, None),
        }
        measured: dict[str, list[dict[str, float]]] = {name: [] for name in PHASES}
        for r in range(rounds):
            order = PHASES[r % len(PHASES) :] + PHASES[: r % len(PHASES)]
            for name in order:
                one, then = steps[name]
                measured[name].append(await _measure(redis, orders, inflight, one, then))
        rows = []
        medians = {
            name: statistics.median(m["redis_cpu_us"] for m in measured[name]) for name in PHASES
        }
        for name in PHASES:
            cpu = [m["redis_cpu_us"] for m in measured[name]]
            rows.append(
                {
                    "phase": name,
                    "operations": orders * rounds,
                    "redis_cpu_us_per_op": round(medians[name], 1),
                    "cpu_us_per_op_rounds": [round(c, 1) for c in cpu],
                    "script_calls_per_op": round(
                        statistics.median(m["script_calls"] for m in measured[name]), 2
                    ),
                    "script_us_per_call": round(
                        statistics.median(m["script_us_per_call"] for m in measured[name]), 1
                    ),
                    "ratio_to_place_order": round(medians[name] / medians["place_order"], 3),
                    "ratio_to_cluster_form": round(
                        medians[name] / medians["place_order, cluster form"], 3
                    ),
                }
            )
        # What the stripes hold now, against what the phases say they moved.
        stripe_keys = [stripe(p, ph) for p in range(partitions.PARTITIONS) for ph in phones]
        async with redis.pipeline(transaction=False) as pipe:
            for key in stripe_keys:
                pipe.hmget(key, "sold", "got")
            stored = await pipe.execute()
        counts["stripes_sold_field"] = sum(int(sold or 0) for sold, _ in stored)
        counts["stripes_got_beyond_seed"] = sum(int(got) - PLENTY for _, got in stored)
        return {
            "phases": rows,
            "predictions": predictions(medians, share, bench_today),
            "counts": counts,
            "busiest_share": share,
        }
    finally:
        await gateway.aclose()
        await redis.aclose()
        await pool.aclose()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=3000, help="operations per phase and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inflight", type=int, default=16)
    parser.add_argument("--share", type=float, default=BUSIEST_SHARE)
    parser.add_argument(
        "--bench-today", type=float, default=BENCH_TODAY_A, help="bench_tier's (a) today"
    )
    options = parser.parse_args(argv)
    if not (1 <= options.orders <= 100_000 and 1 <= options.rounds <= 20):
        parser.error("--orders 1..100000 and --rounds 1..20 keep the run bounded")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="escrow-probe-") as directory:
        result = asyncio.run(
            run(
                options.orders,
                options.rounds,
                options.inflight,
                Path(directory),
                options.share,
                options.bench_today,
            )
        )
    for row in result["phases"]:
        print(json.dumps(row))
    for row in result["predictions"]:
        print(json.dumps(row))
    print(
        json.dumps(
            {
                "counts": result["counts"],
                "load_average_1m": [round(load, 2), round(os.getloadavg()[0], 2)],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
