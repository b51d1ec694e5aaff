"""CPU per mail of the mail worker, without the stack: one worker drains a backlog.

    .venv/bin/python -m loadtests.bench_mail_cpu [--mails 20000] [--workers 1]
        [--set MAIL_X=value] [--profile out.txt]

Starts a redis-server (AOF, appendfsync always, as the stack's), writes
``--mails`` completed orders and their ``order.completed`` events the way the
order scripts leave them, starts the discarding SMTP sink
(loadtests/smtp_discard.py) and ``--workers`` ``python -m mail`` processes with
make run's defaults (but ``--set``), and waits until every mail was accepted.
Prints the workers' CPU (user + system, from /proc) per mail, redis's CPU per
mail, the drain rate and the sink's duplicates. With ``--profile``, py-spy
records the first worker meanwhile (raw folded stacks into that file) and the
top frames by own and inclusive time are printed.

What ``make bench``'s mail section (loadtests/bench_mail_lag.py) cannot tell
apart, because the workers share the stack's CPU there: the worker's own cost.
Run it on a quiet machine: it measures CPU per mail.

Steady mode: the cost when mails trickle in rather than wait in a backlog.

    .venv/bin/python -m loadtests.bench_mail_cpu --rate 600 [--seconds 20]
        [--rounds 2] [--ab REF] [--tick 0.002] [--profile out.txt]

Per round, a fresh redis-server and one worker; a writer places completed
orders through the real place_order script (loadtests/audit_load.py's Shop)
at ``--rate`` a second, in ``--tick`` second steps, for ``--seconds``; then
the worker finishes what is left. Reported: the worker's CPU per mail from
the first order to the last mail, redis's, and the lag of every mail (the
order.completed entry's time to the sent marker's). With ``--ab REF`` the
worker of that ref (a ``git worktree`` checkout, removed after) runs the
same rounds, alternating A first and B first, so drift on a shared box hits
both alike; B is this tree. Worker and redis are pinned to the stack CPUs,
the writer and the sink to the load CPUs (loadtests/rig.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from app import keys
from app.ids import new_id
from app.ops.instances import ROOT, mail_argv
from app.partitions import PARTITIONS, partition_of
from app.vocabulary import COMPLETED, STATUSES, encode_items, stored_order_fields
from loadtests import rig
from loadtests.ab_refs import checkout
from loadtests.audit_load import Shop, write_at
from loadtests.bench_drivers import folded_samples
from loadtests.bench_mail_lag import (
    completed_between,
    dead_letters,
    percentile,
    sent_at,
    start_sink,
    stop_sink,
)
from loadtests.support.servers import clean_env, running_redis, stop_process

PHONES = 20


def seed(redis: Redis, mails: int) -> None:
    """``mails`` completed orders of 1-3 lines and their events, in pages."""
    phones = [new_id() for _ in range(PHONES)]
    pipe = redis.pipeline(transaction=False)
    for index, phone in enumerate(phones):
        pipe.hset(keys.phone(phone), mapping={"id": phone, "name": f"Phone {index}"})
    pipe.execute()
    for start in range(0, mails, 1000):
        pipe = redis.pipeline(transaction=False)
        for n in range(start, min(mails, start + 1000)):
            order_id, customer_id = new_id(), new_id()
            lines = [(phones[(n + k) % PHONES], 1 + k, 19_900 + 100 * k) for k in range(1 + n % 3)]
            pipe.hset(
                keys.customer(customer_id),
                mapping={
                    "id": customer_id,
                    "name": "Ada",
                    "surname": "Lovelace",
                    "email": f"customer{n}@example.test",
                    "balance_cents": 100_000,
                },
            )
            pipe.hset(
                keys.order(order_id),
                mapping=stored_order_fields(
                    {
                        "customer_id": customer_id,
                        "status": COMPLETED,
                        "items": encode_items(lines),
                        "total_cents": sum(q * c for _, q, c in lines),
                        "seq": 1,
                        "created_at": time.time_ns() // 1_000_000,
                    }
                ),
            )
            pipe.xadd(
                keys.events(partition_of(order_id)),
                {
                    "type": STATUSES[COMPLETED].event,
                    "order_id": order_id,
                    "customer_id": customer_id,
                    "status": COMPLETED,
                    "request_id": "bench",
                    "balance_cents": "90000",
                    "at": str(time.time_ns() // 1_000_000),
                },
            )
        pipe.execute()


def start_worker(
    tree: Path,
    redis_url: str,
    smtp_port: int,
    name: str,
    settings: dict[str, str],
    cpus: frozenset[int] | None = None,
) -> subprocess.Popen:
    """``python -m mail`` of the checkout ``tree`` with make run's defaults (but ``settings``)."""
    return subprocess.Popen(
        mail_argv(),
        cwd=tree,
        env=clean_env(
            **settings,
            REDIS_URL=redis_url,
            SMTP_HOST="127.0.0.1",
            SMTP_PORT=str(smtp_port),
            MAIL_WORKER_NAME=name,
            LOG_LEVEL=settings.get("LOG_LEVEL", "INFO"),
            PYTHONPATH=str(tree),
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=rig.pinned_to(cpus),
    )


def start_profiler(pid: int, out: Path) -> subprocess.Popen:
    """py-spy on ``pid``, raw folded stacks into ``out`` until SIGINT."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [py_spy, "record", "-p", str(pid), "-r", "250", "-f", "raw", "--nonblocking", "-o", out],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def waiting(redis: Redis) -> int:
    """Entries of the mailer group not yet acknowledged: pending, or not even read."""
    total = 0
    for partition in range(PARTITIONS):
        stream = keys.events(partition)
        total += redis.xpending(stream, keys.MAIL_GROUP)["pending"]
        info = [g for g in redis.xinfo_groups(stream) if g["name"] == keys.MAIL_GROUP]
        total += info[0]["lag"] or 0
    return total


def create_groups(redis: Redis) -> None:
    for partition in range(PARTITIONS):
        redis.xgroup_create(keys.events(partition), keys.MAIL_GROUP, id="0", mkstream=True)


def drain(args: argparse.Namespace, settings: dict[str, str]) -> int:
    """The backlog mode: ``--mails`` seeded, ``--workers`` workers drain them."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-mail-cpu-") as tmp,
        running_redis(Path(tmp) / "redis") as server,
    ):
        redis = Redis.from_url(server.url, decode_responses=True)
        create_groups(redis)
        seed(redis, args.mails)
        sink, port, summary = start_sink(Path(tmp), None)
        redis_cpu = rig.cpu_seconds([server.proc.pid])
        procs = [
            start_worker(ROOT, server.url, port, f"cpu-{index}", settings)
            for index in range(args.workers)
        ]
        spy = start_profiler(procs[0].pid, args.profile) if args.profile else None
        began = time.monotonic()
        try:
            sent = 0
            while sent < args.mails and time.monotonic() - began < 600:
                time.sleep(0.2)  # polling the group's backlog
                sent = args.mails - waiting(redis)
            elapsed = time.monotonic() - began
            worker_cpu = rig.cpu_seconds([p.pid for p in procs])
            redis_cpu = rig.cpu_seconds([server.proc.pid]) - redis_cpu
        finally:
            if spy is not None:
                stop_process(spy, sig=2)
            for proc in procs:
                stop_process(proc)
            tally = stop_sink(sink, summary)
        dead = dead_letters(redis)
        redis.close()
    print(
        f"{sent} mails in {elapsed:.1f} s ({sent / elapsed:,.0f}/s) by {args.workers} worker(s)"
        f" ({settings or 'defaults'}): worker CPU {1000 * worker_cpu / max(1, sent):.3f} ms/mail,"
        f" redis CPU {1000 * redis_cpu / max(1, sent):.3f} ms/mail;"
        f" sink: {tally.get('mails')} mails, {tally.get('duplicates')} duplicates,"
        f" peak {tally.get('peak_open_sessions')} sessions; dead letters {dead}"
    )
    if args.profile and args.profile.exists():
        print_profile(args.profile)
    return 0


# ---- steady mode ------------------------------------------------------------------------


async def _shop(url: str) -> Shop:
    """Phones and customers through the real scripts; the Shop's ids, without its client."""
    client = AsyncRedis.from_url(url)
    try:
        shop = Shop(client, all_completed=True)
        await shop.load()
        await shop.create()
    finally:
        await client.aclose()
    return shop


async def _write(url: str, made: Shop, rate: float, seconds: float, tick: float) -> int:
    """Completed orders at ``rate`` a second for ``seconds``; how many were placed."""
    client = AsyncRedis.from_url(url)
    try:
        shop = Shop(client, all_completed=True)
        shop.shas, shop.phones, shop.customers = made.shas, made.phones, made.customers
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        placed, _ = await write_at(shop, rate, stop, tick)
    finally:
        await client.aclose()
    return placed


def wait_alive(redis: Redis, name: str, proc: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not redis.exists(keys.mail_worker_alive(name)):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mail worker {name} did not start")
        time.sleep(0.05)  # polling for the worker's health key


def steady_round(
    tree: Path,
    args: argparse.Namespace,
    settings: dict[str, str],
    split: rig.CpuSplit,
    directory: Path,
    profile: Path | None,
) -> dict[str, Any]:
    """One worker of ``tree`` while completed orders arrive at ``args.rate`` a second."""
    stack_cpus = split.stack if split.pinned else None
    load_cpus = split.load if split.pinned else None
    with running_redis(directory / "redis") as server:
        if stack_cpus:
            rig.pin_tree(server.proc.pid, stack_cpus)
        redis = Redis.from_url(server.url, decode_responses=True)
        create_groups(redis)
        shop = asyncio.run(_shop(server.url))
        sink, port, summary = start_sink(directory, load_cpus)
        name = f"steady-{directory.name}"
        proc = start_worker(tree, server.url, port, name, settings, stack_cpus)
        spy = None
        try:
            wait_alive(redis, name, proc)
            spy = start_profiler(proc.pid, profile) if profile else None
            worker_before = rig.cpu_seconds([proc.pid])
            redis_before = rig.cpu_seconds([server.proc.pid])
            start_ms = time.time_ns() // 10**6
            placed = asyncio.run(_write(server.url, shop, args.rate, args.seconds, args.tick))
            end_ms = time.time_ns() // 10**6
            deadline = time.monotonic() + 60
            while waiting(redis) and time.monotonic() < deadline:
                time.sleep(0.05)  # polling until the worker has acknowledged everything
            worker_cpu = rig.cpu_seconds([proc.pid]) - worker_before
            redis_cpu = rig.cpu_seconds([server.proc.pid]) - redis_before
        finally:
            if spy is not None:
                stop_process(spy, sig=2)
            stop_process(proc)
            tally = stop_sink(sink, summary)
        completed = completed_between(redis, start_ms, end_ms)
        sent = sent_at(redis, list(completed))
        dead = dead_letters(redis)
        redis.close()
    lags = [(sent[o] - at) / 1000 for o, at in completed.items() if o in sent]
    mails = len(sent)
    window = (end_ms - start_ms) / 1000
    return {
        "placed": placed,
        "orders_per_s": len(completed) / window,
        "mails": mails,
        "unsent": len(completed) - mails,
        "worker_ms_per_mail": 1000 * worker_cpu / max(1, mails),
        "redis_ms_per_mail": 1000 * redis_cpu / max(1, mails),
        "lags": lags,
        "duplicates": tally.get("duplicates"),
        "dead": dead,
    }


def steady(args: argparse.Namespace, settings: dict[str, str]) -> int:
    """The steady mode (see the module docstring): rounds per side, and B/A."""
    split = rig.cpu_split()
    if split.pinned:
        os.sched_setaffinity(0, split.load)  # the writer
    load_before = os.getloadavg()
    results: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    with (
        tempfile.TemporaryDirectory(prefix="bench-mail-steady-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        trees = {"B": ROOT}
        if args.ab:
            trees["A"] = stack.enter_context(checkout(args.ab, Path(tmp) / "a"))
        sides = [side for side in ("A", "B") if side in trees]
        for index in range(args.rounds):
            for side in sides if index % 2 == 0 else sides[::-1]:
                directory = Path(tmp) / f"{side}{index}"
                directory.mkdir()
                profile = args.profile if side == "B" and index == 0 else None
                result = steady_round(trees[side], args, settings, split, directory, profile)
                results[side].append(result)
                print(f"round {index} {side}: {summary_line(result)}", flush=True)
    load_after = os.getloadavg()
    print(
        f"offered {args.rate:g} orders/s for {args.seconds:g} s x {args.rounds} round(s),"
        f" tick {args.tick:g} s, {settings or 'defaults'}; {split.describe()};"
        f" load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    medians = {}
    for side in sides:
        rounds = results[side]
        medians[side] = {
            "worker": statistics.median(r["worker_ms_per_mail"] for r in rounds),
            "redis": statistics.median(r["redis_ms_per_mail"] for r in rounds),
            "lags": sorted(lag for r in rounds for lag in r["lags"]),
        }
        lags = medians[side]["lags"]
        label = f"A ({args.ab})" if side == "A" else "B (this tree)"
        print(
            f"{label}: worker CPU {medians[side]['worker']:.3f} ms/mail, redis CPU"
            f" {medians[side]['redis']:.3f} ms/mail (medians of rounds); {lag_text(lags)}"
            f" ({len(lags)} mails)"
        )
    if "A" in medians:
        a, b = medians["A"], medians["B"]
        print(
            f"B/A: worker CPU per mail {b['worker'] / a['worker']:.2f}x, redis CPU per mail"
            f" {b['redis'] / a['redis']:.2f}x, lag p50"
            f" {percentile(b['lags'], 0.5) / max(1e-9, percentile(a['lags'], 0.5)):.2f}x, p99"
            f" {percentile(b['lags'], 0.99) / max(1e-9, percentile(a['lags'], 0.99)):.2f}x"
        )
    if args.profile and args.profile.exists():
        print_profile(args.profile)
    return 0


def lag_text(lags: list[float]) -> str:
    """p50, p99 and max of sorted lags (seconds), in ms."""
    return (
        f"lag p50 {1000 * percentile(lags, 0.5):.1f} ms, p99 {1000 * percentile(lags, 0.99):.1f}"
        f" ms, max {1000 * max(lags, default=0):.1f} ms"
    )


def summary_line(result: dict[str, Any]) -> str:
    return (
        f"{result['orders_per_s']:,.0f} orders/s, {result['mails']} mails"
        f" ({result['unsent']} unsent), worker {result['worker_ms_per_mail']:.3f} ms/mail,"
        f" redis {result['redis_ms_per_mail']:.3f} ms/mail, {lag_text(sorted(result['lags']))},"
        f" duplicates {result['duplicates']}, dead {result['dead']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_mail_cpu", description=__doc__)
    parser.add_argument("--mails", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="MAIL_X=value")
    parser.add_argument("--profile", type=Path, help="py-spy raw output of the first worker")
    parser.add_argument("--rate", type=float, help="steady mode: completed orders a second")
    parser.add_argument("--seconds", type=float, default=20.0, help="steady mode: per round")
    parser.add_argument("--rounds", type=int, default=2, help="steady mode: rounds per side")
    parser.add_argument("--tick", type=float, default=0.002, help="steady mode: writer step (s)")
    parser.add_argument("--ab", metavar="REF", help="steady mode: also the worker of REF (side A)")
    args = parser.parse_args(argv)
    settings = dict(item.split("=", 1) for item in args.set)
    if args.rate:
        return steady(args, settings)
    return drain(args, settings)


def print_profile(raw: Path, rows: int = 25) -> None:
    """Top frames of py-spy's folded stacks, by own and by inclusive samples."""
    total, own, inclusive = folded_samples(raw)
    for title, table in (("own", own), ("inclusive", inclusive)):
        print(f"-- py-spy, {total} samples, by {title} time")
        for frame, n in sorted(table.items(), key=lambda kv: -kv[1])[:rows]:
            print(f"{100 * n / max(1, total):5.1f}%  {frame}")


if __name__ == "__main__":
    sys.exit(main())
