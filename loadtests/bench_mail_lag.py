"""Does confirmation mail keep pace with orders at the stack's capacity?

    .venv/bin/python -m loadtests.bench_mail_lag [--seconds 60] [--workers 2]

Also a section of ``make bench`` (loadtests/bench.py's EXTRA_SECTIONS). One fresh
stack (loadtests/stack.py, nginx's limits out of the way), pinned like the main
bench (loadtests/rig.py): redis, the app instances, nginx and the mail workers on
the stack CPUs; wrk, the open-loop generator and the SMTP sink on the load CPUs.
The sink (loadtests/smtp_discard.py) accepts and discards, so what is measured is
the worker, not the sink. Then:

1. the capacity without mail workers, for reference: wrk closed loop on
   ``POST /orders`` (every order completes at once) for a few seconds;
2. per worker count (1, then ``--workers``, make run's MAIL_WORKERS default),
   ``python -m mail`` processes with make run's default settings:

   a. the capacity of the stack with its mail workers (the stack a user runs):
      wrk closed loop for a few seconds gives the CPU per order (redis, app,
      nginx) and per mail (the workers); the capacity is the order rate the CPU
      the stack got covers with each order's mail. A closed loop's own rate is
      not it: it keeps the app busy and the workers get only their scheduler
      share, so the mail falls behind at any closed-loop peak by construction;
   b. once that mail is out, the open-loop generator (loadtests/openloop.py)
      offers that rate for ``--seconds`` (at least 60), the mail backlog sampled
      every 2 s (app/mail_backlog.py), then up to ``--drain`` seconds for the
      rest. For every order completed in the window: its lag, from the
      ``order.completed`` event (the entry id's time) to the worker's
      sent marker (``keys.mail_sent``), written right after the server's 250.

Reported per run: the capacity and its CPU figures, the rate offered, completed
orders/s, mails/s, lag p50/p99/max, the backlog at the end of the load and its
trend over the second half, the time to drain, duplicates by Message-ID (the
sink's count), dead letters, mails still unsent. Targets (issue 16) are
reported, never asserted. Run alone, it writes ``loadtests/reports/BENCH-mail.md``
and replaces its section in ``loadtests/reports/BENCH.md`` when that exists.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app import keys
from app.env import env_int
from app.mail_backlog import ORDER_COMPLETED, entry_ms, read_mail_backlog
from app.ops.instances import ROOT, mail_argv
from app.partitions import PARTITIONS
from loadtests import rig
from loadtests.bench_data import provision
from loadtests.bench_drivers import orders_openloop_spec, orders_wrk, write_wrk_data
from loadtests.stack import LoadStack, launch
from loadtests.support.servers import clean_env, free_port, stop_process, wait_for_port

TITLE = "Mail keeps pace with orders (issue 16)"
REPORTS = ROOT / "loadtests" / "reports"
LIMITS = {
    "LIMIT_WRITE_RATE": "1000000r/s",
    "LIMIT_WRITE_BURST": "1000000",
    "LIMIT_READ_RATE": "1000000r/s",
    "LIMIT_READ_BURST": "1000000",
    "LIMIT_CONN": "60000",
}
TARGET_LAG_P99_S = 10.0
SAMPLE_EVERY_S = 2.0
CAPACITY_SECONDS = 8
PROBE_SECONDS = 8
MAX_PROBES = 3


def log(message: str) -> None:
    print(f"[bench-mail {time.strftime('%H:%M:%S')}] {message}", flush=True)


def percentile(values: list[float], q: float) -> float:
    return rig.percentile(sorted(values), q)


# ---- processes ----------------------------------------------------------------------------


def start_sink(directory: Path, cpus: Any) -> tuple[subprocess.Popen, int, Path]:
    port, summary = free_port(), directory / f"sink-{time.monotonic_ns()}.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtests.smtp_discard", str(port), str(summary)],
        cwd=ROOT,
        env=clean_env(PYTHONPATH=str(ROOT)),
        preexec_fn=rig.pinned_to(cpus),
    )
    wait_for_port(port, proc=proc)
    return proc, port, summary


def stop_sink(proc: subprocess.Popen, summary: Path) -> dict[str, Any]:
    stop_process(proc)
    return json.loads(summary.read_text()) if summary.exists() else {}


def start_workers(
    count: int, redis_url: str, smtp_port: int, directory: Path, cpus: Any, settings: dict
) -> list[subprocess.Popen]:
    """``python -m mail`` x count with make run's defaults, but where to connect and
    ``settings`` (MAIL_* variables from --set)."""
    procs = []
    for index in range(count):
        env = clean_env(
            **settings,
            REDIS_URL=redis_url,
            SMTP_HOST="127.0.0.1",
            SMTP_PORT=str(smtp_port),
            MAIL_WORKER_NAME=f"bench-mail-{count}-{index}",
            LOG_LEVEL="WARNING",
            PYTHONPATH=str(ROOT),
        )
        log_file = (directory / f"mail-{count}-{index}.log").open("ab")
        procs.append(
            subprocess.Popen(
                mail_argv(),
                cwd=ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=rig.pinned_to(cpus),
            )
        )
        log_file.close()
    return procs


def stack_pids(stack: LoadStack) -> list[int]:
    procs = [
        stack.stack.redis.proc,
        *(i.proc for i in stack.stack.instances),
        stack.stack.nginx.proc,
    ]
    return [p.pid for p in procs if p is not None]


# ---- what Redis says ----------------------------------------------------------------------


async def _backlog(url: str) -> tuple[int, float]:
    client = Redis.from_url(url, decode_responses=True)
    try:
        backlog = await read_mail_backlog(client)
    finally:
        await client.aclose()
    if backlog is None:
        return 0, 0.0
    return backlog.pending + backlog.undelivered, backlog.oldest_age_s(time.time_ns() // 10**6)


def backlog(url: str) -> tuple[int, float]:
    """(mails waiting, age of the oldest in seconds)."""
    return asyncio.run(_backlog(url))


def completed_between(redis: SyncRedis, start_ms: int, end_ms: int) -> dict[str, int]:
    """order id -> event time (ms) of the order.completed entries in the window."""
    found: dict[str, int] = {}
    for partition in range(PARTITIONS):
        cursor = f"{start_ms}-0"
        while True:
            page = redis.xrange(
                keys.events(partition), cursor, f"{end_ms}-18446744073709551615", count=5000
            )
            for entry_id, fields in page:
                if fields.get("type") == ORDER_COMPLETED:
                    found[fields["order_id"]] = entry_ms(entry_id)
            if len(page) < 5000:
                break
            cursor = f"({page[-1][0]}"
    return found


def dead_letters(redis: SyncRedis) -> int:
    return sum(redis.xlen(keys.mail_dead(p)) for p in range(PARTITIONS))


def sent_at(redis: SyncRedis, order_ids: list[str]) -> dict[str, int]:
    """order id -> when its sent marker says the server accepted it (ms)."""
    out = {}
    for start in range(0, len(order_ids), 2000):
        chunk = order_ids[start : start + 2000]
        for order_id, raw in zip(
            chunk, redis.mget([keys.mail_sent(o) for o in chunk]), strict=True
        ):
            if raw:
                out[order_id] = int(json.loads(raw)["at"])
    return out


# ---- one run --------------------------------------------------------------------------------


def mails_between(redis: SyncRedis, order_ids: list[str], start_ms: int, end_ms: int) -> int:
    """Of these orders, how many mails the server accepted within [start_ms, end_ms]."""
    return sum(1 for at in sent_at(redis, order_ids).values() if start_ms <= at <= end_ms)


def aof_rewrites(redis: SyncRedis) -> int:
    return int(redis.info("persistence").get("aof_rewrites", 0))


def rewrite_aof(redis: SyncRedis, seconds: float = 120) -> None:
    """BGREWRITEAOF and wait (bounded) until it is done."""
    with contextlib.suppress(ResponseError):  # one is running already
        redis.bgrewriteaof()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        info = redis.info("persistence")
        if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
            return
        time.sleep(0.2)  # polling the rewrite, bounded by the deadline


def wait_drained(url: str, seconds: float) -> float | None:
    """Seconds until nothing waits for its mail, or None when it did not happen in time."""
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        if backlog(url)[0] == 0:
            return time.monotonic() - began
        time.sleep(0.2)  # polling the backlog, bounded by ``seconds``
    return None


def capacity_with_mail(
    stack: LoadStack, data: Path, procs: list[subprocess.Popen], split: rig.CpuSplit
) -> dict[str, Any]:
    """wrk closed loop on POST /orders for CAPACITY_SECONDS with the mail workers
    running, and the order rate the CPU the stack got covers together with each
    order's mail: (stack CPU + workers' CPU) / (CPU per order + CPU per mail).

    The closed loop alone is not that rate: it keeps the app busy, and the
    workers get only their scheduler share of the CPU (about a tenth here), so
    the mail falls behind by construction at any closed-loop peak."""
    redis = SyncRedis.from_url(stack.redis_url, decode_responses=True)
    stack_before = rig.cpu_seconds(stack_pids(stack))
    workers_before = rig.cpu_seconds([p.pid for p in procs])
    start_ms = time.time_ns() // 10**6
    load = orders_wrk(stack, data, seconds=CAPACITY_SECONDS, cpus=split.load or None)
    end_ms = time.time_ns() // 10**6
    stack_cpu = rig.cpu_seconds(stack_pids(stack)) - stack_before
    worker_cpu = rig.cpu_seconds([p.pid for p in procs]) - workers_before
    completed = completed_between(redis, start_ms, end_ms)
    mails = mails_between(redis, list(completed), start_ms, end_ms)
    redis.close()
    window = (end_ms - start_ms) / 1000
    per_order = stack_cpu / max(1, len(completed))
    per_mail = worker_cpu / max(1, mails)
    cpus = (stack_cpu + worker_cpu) / window
    return {
        "closed_loop_rps": load.get("ok_rps", 0.0),
        "closed_loop_mails_per_s": mails / window,
        "stack_cpu_ms_per_order": 1000 * per_order,
        "worker_cpu_ms_per_mail": 1000 * per_mail,
        "cpus_used": cpus,
        "rate": cpus / (per_order + per_mail) if mails else load.get("ok_rps", 0.0),
    }


def probe_costs(
    stack: LoadStack,
    people: list[dict],
    phone_ids: list[str],
    procs: list[subprocess.Popen],
    rate: float,
    split: rig.CpuSplit,
    directory: Path,
) -> dict[str, Any]:
    """PROBE_SECONDS of open-loop orders at ``rate``: CPU per order (redis, app,
    nginx) and per mail sent meanwhile (the workers)."""
    redis = SyncRedis.from_url(stack.redis_url, decode_responses=True)
    stack_before = rig.cpu_seconds(stack_pids(stack))
    workers_before = rig.cpu_seconds([p.pid for p in procs])
    start_ms = time.time_ns() // 10**6
    drive_open_loop(stack, people, phone_ids, rate, PROBE_SECONDS, split, directory)
    end_ms = time.time_ns() // 10**6
    stack_cpu = rig.cpu_seconds(stack_pids(stack)) - stack_before
    worker_cpu = rig.cpu_seconds([p.pid for p in procs]) - workers_before
    waiting = backlog(stack.redis_url)[0]
    completed = completed_between(redis, start_ms, end_ms)
    mails = mails_between(redis, list(completed), start_ms, end_ms)
    redis.close()
    # The generator's start-up is not part of the load: from the first order on.
    first = min(completed.values(), default=start_ms)
    window = max(0.001, (end_ms - first) / 1000)
    return {
        "rate": rate,
        "orders": len(completed),
        "mails": mails,
        "orders_per_s": len(completed) / window,
        "mails_per_s": mails / window,
        "backlog_at_end": waiting,
        # Keeping up: what waits at the end is at most half a second of orders.
        "keeps_up": waiting <= max(50, rate / 2),
        "stack_cpu_ms_per_order": 1000 * stack_cpu / max(1, len(completed)),
        "worker_cpu_ms_per_mail": 1000 * worker_cpu / max(1, mails),
    }


def drive_open_loop(
    stack: LoadStack,
    people: list[dict],
    phone_ids: list[str],
    rate: float,
    seconds: int,
    split: rig.CpuSplit,
    directory: Path,
) -> dict[str, Any]:
    """POST /orders at ``rate`` per second for ``seconds`` (loadtests/openloop.py)."""
    phases = [{"name": "mail-lag", "rate": round(rate, 1), "seconds": seconds}]
    spec = orders_openloop_spec(stack, people, phone_ids, phases, warm_connections=128)
    raw = rig.run_openloop(spec, directory / f"openloop-{time.monotonic_ns()}", split.load or None)
    [level] = rig.phase_figures(raw, phases)
    return level


def one_run(
    stack: LoadStack,
    people: list[dict],
    phone_ids: list[str],
    data: Path,
    workers: int,
    seconds: int,
    drain_s: int,
    split: rig.CpuSplit,
    directory: Path,
    settings: dict[str, str],
) -> dict[str, Any]:
    redis = SyncRedis.from_url(stack.redis_url, decode_responses=True)
    # Each run starts from an empty backlog: what an earlier run left unsent is
    # counted there, not carried over (the group restarts at the stream's end).
    for partition in range(PARTITIONS):
        redis.xgroup_destroy(keys.events(partition), keys.MAIL_GROUP)
        redis.xgroup_create(keys.events(partition), keys.MAIL_GROUP, id="$", mkstream=True)
        redis.delete(keys.mail_retry(partition))
    dead_before = dead_letters(redis)
    # An AOF rewrite (a fork that copies the whole data set) is due once the
    # AOF doubled: start each run right after one, not with one half way.
    rewrite_aof(redis)
    rewrites_before = aof_rewrites(redis)
    sink, port, summary_path = start_sink(directory, split.load or None)
    procs = start_workers(workers, stack.redis_url, port, directory, split.stack or None, settings)
    try:
        deadline = time.monotonic() + 30
        names = [keys.mail_worker_alive(f"bench-mail-{workers}-{i}") for i in range(workers)]
        while redis.exists(*names) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError("the mail workers did not start")
            time.sleep(0.1)  # polling for the workers' alive keys
        capacity = capacity_with_mail(stack, data, procs, split)
        log(
            f"  capacity with {workers} mail worker(s): closed loop"
            f" {capacity['closed_loop_rps']:,.0f} orders/s and"
            f" {capacity['closed_loop_mails_per_s']:,.0f} mails/s;"
            f" {capacity['stack_cpu_ms_per_order']:.3f} ms CPU per order,"
            f" {capacity['worker_cpu_ms_per_mail']:.3f} ms per mail, {capacity['cpus_used']:.2f}"
            f" CPUs -> {capacity['rate']:,.0f} orders/s with their mail"
        )
        if wait_drained(stack.redis_url, drain_s) is None:
            log("  the capacity run's mail did not drain; measuring anyway")
        # Orders cost more CPU in an open loop than in wrk's closed one (fewer
        # requests share each event-loop turn), and the workers need their CPU
        # share at that rate: short open-loop probes step down to a rate at which
        # the mail keeps up.
        rate, probes = capacity["rate"], []
        for _ in range(MAX_PROBES):
            probe = probe_costs(stack, people, phone_ids, procs, rate, split, directory)
            probes.append(probe)
            log(
                f"  open-loop probe at {rate:,.0f}/s: {probe['orders_per_s']:,.0f} orders/s,"
                f" {probe['mails_per_s']:,.0f} mails/s, {probe['stack_cpu_ms_per_order']:.3f} ms"
                f" CPU per order, {probe['worker_cpu_ms_per_mail']:.3f} ms per mail,"
                f" {probe['backlog_at_end']} waiting at the end"
            )
            if wait_drained(stack.redis_url, drain_s) is None:
                log("  the probe's mail did not drain; measuring anyway")
            if probe["keeps_up"]:
                break
            # Half way to the rate the mail did keep, 5% lower: overload starves the
            # workers more than a rate just past the capacity does.
            ratio = min(1.0, probe["mails_per_s"] / max(1.0, probe["orders_per_s"]))
            rate *= 0.95 * (0.5 + 0.5 * ratio)
        capacity["probes"] = probes
        capacity["closed_loop_rate"] = capacity["rate"]
        capacity["rate"] = rate
        log(f"  capacity with the mail: {rate:,.0f} orders/s")
        samples: list[tuple[float, int, float]] = []
        stack_cpu_before = rig.cpu_seconds(stack_pids(stack))
        worker_cpu_before = rig.cpu_seconds([p.pid for p in procs])
        start_ms = time.time_ns() // 10**6
        began = time.monotonic()
        load: dict[str, Any] = {}

        def drive() -> None:
            load.update(
                drive_open_loop(
                    stack, people, phone_ids, capacity["rate"], seconds, split, directory
                )
            )

        driver = threading.Thread(target=drive)
        driver.start()
        while driver.is_alive():
            waiting, oldest = backlog(stack.redis_url)
            samples.append((time.monotonic() - began, waiting, oldest))
            driver.join(SAMPLE_EVERY_S)
        end_ms = time.time_ns() // 10**6
        stack_cpu = rig.cpu_seconds(stack_pids(stack)) - stack_cpu_before
        worker_cpu = rig.cpu_seconds([p.pid for p in procs]) - worker_cpu_before
        waiting_at_end, oldest_at_end = backlog(stack.redis_url)
        drained_in = wait_drained(stack.redis_url, drain_s)
        completed = completed_between(redis, start_ms, end_ms)
        # The window: from the first to the last order completed in it (the
        # generator takes a moment to start and to finish).
        first = min(completed.values(), default=start_ms)
        last = max(completed.values(), default=end_ms)
        window_s = max(0.001, (last - first) / 1000)
        accepted = sent_at(redis, list(completed))
        # A mail still unsent after the drain counts with its wait so far: a lower bound.
        now = time.time_ns() // 10**6
        lags = [(accepted.get(o, now) - at) / 1000 for o, at in completed.items()]
        in_window = sum(1 for at in accepted.values() if first <= at <= last)
        # The same window shifted by the median lag: the mail of the window's
        # first orders goes out that much later, and so does the last's.
        shift = int(1000 * percentile(lags, 0.50))
        in_shifted = sum(1 for at in accepted.values() if first + shift <= at <= last + shift)
        last_sent = max(accepted.values(), default=last)
        after = sum(1 for at in accepted.values() if at > last)
    finally:
        for proc in procs:
            stop_process(proc)
        sink_summary = stop_sink(sink, summary_path)
    half = [s for s in samples if s[0] >= samples[-1][0] / 2] if samples else []
    trend = (
        (half[-1][1] - half[0][1]) / (half[-1][0] - half[0][0])
        if len(half) >= 2 and half[-1][0] > half[0][0]
        else 0.0
    )
    result = {
        "workers": workers,
        "capacity": capacity,
        "offered_rps": load.get("offered_rps", 0.0),
        "accepted_p99_ms": load.get("accepted_p99_ms", 0.0),
        "window_s": window_s,
        "orders": len(completed),
        "orders_per_s": len(completed) / window_s,
        "mails_in_window_per_s": in_window / window_s,
        "mails_shifted_per_s": in_shifted / window_s,
        "mails": len(accepted),
        "mails_per_s_overall": len(accepted) / max(0.001, (last_sent - first) / 1000),
        "mails_per_s_after": after / max(0.001, (last_sent - last) / 1000) if after else 0.0,
        "worker_cpu_ms_per_mail": 1000 * worker_cpu / max(1, len(accepted)),
        "stack_cpu_ms_per_order": 1000 * stack_cpu / max(1, len(completed)),
        "lag_p50_s": percentile(lags, 0.50),
        "lag_p99_s": percentile(lags, 0.99),
        "lag_max_s": max(lags, default=0.0),
        "unsent": len(completed) - len(accepted),
        "backlog_at_end": waiting_at_end,
        "oldest_at_end_s": oldest_at_end,
        "backlog_max": max((s[1] for s in samples), default=0),
        "backlog_trend_per_s": trend,
        "drain_s": drained_in,
        "duplicates": sink_summary.get("duplicates"),
        "sink_mails": sink_summary.get("mails"),
        "peak_sessions": sink_summary.get("peak_open_sessions"),
        "dead_letters": dead_letters(redis) - dead_before,
        "aof_rewrites": aof_rewrites(redis) - rewrites_before,
        "samples": samples,
    }
    redis.close()
    return result


def measure(
    seconds: int,
    worker_counts: list[int],
    drain_s: int,
    directory: Path,
    settings: dict[str, str] | None = None,
) -> dict[str, Any]:
    settings = settings or {}
    split = rig.cpu_split()
    load_before = os.getloadavg()[0]
    runs = []
    capacity: dict[str, Any] = {}
    # A fresh stack per worker count: the runs must not inherit each other's data
    # (a larger AOF to rewrite, longer sorted sets) or their order.
    for workers in worker_counts:
        with launch(env=LIMITS, instances=2, workers=1) as stack:
            if split.pinned:
                rig.pin_stack(stack_pids(stack), split.stack)
            log(f"stack up ({split.describe()}); provisioning")
            phone_ids, people = provision(stack, phones=20, customers=200)
            data = directory / "wrk-data.lua"
            write_wrk_data(data, phone_ids, people)
            redis = SyncRedis.from_url(stack.redis_url, decode_responses=True)
            orders_wrk(stack, data, seconds=2, cpus=split.load or None)  # warm-up
            capacity = orders_wrk(stack, data, seconds=CAPACITY_SECONDS, cpus=split.load or None)
            log(f"capacity without mail workers: {capacity['ok_rps']:,.0f} orders/s")
            # The mailer group starts at the run (one_run): these orders are not mailed.
            for partition in range(PARTITIONS):
                redis.xgroup_create(keys.events(partition), keys.MAIL_GROUP, id="$", mkstream=True)
            redis.close()
            log(f"{workers} worker(s): capacity, then {seconds} s of orders at it, then the drain")
            run = one_run(
                stack,
                people,
                phone_ids,
                data,
                workers,
                seconds,
                drain_s,
                split,
                directory,
                settings,
            )
            run["capacity_without_mail"] = capacity["ok_rps"]
            log(
                f"  offered {run['offered_rps']:,.0f}/s: orders {run['orders_per_s']:,.0f}/s,"
                f" mails {run['mails_in_window_per_s']:,.0f}/s,"
                f" lag p50 {run['lag_p50_s']:.2f} s p99 {run['lag_p99_s']:.2f} s"
                f" max {run['lag_max_s']:.2f} s, backlog at end {run['backlog_at_end']},"
                f" duplicates {run['duplicates']}, dead {run['dead_letters']}"
            )
            runs.append(run)
    return {
        "capacity": capacity,
        "runs": runs,
        "split": split.describe(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0],
        "machine": f"{os.cpu_count()} cores",
        "settings": settings,
    }


# ---- the report ---------------------------------------------------------------------------


def _ok(good: bool) -> str:
    return "met" if good else "**not met**"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"`python -m loadtests.bench_mail_lag` ({results['machine']}, {results['split']};"
        f" load average {results['loadavg_before']:.1f} before, {results['loadavg_after']:.1f}"
        " after), make run's mail defaults (MAIL_CONCURRENCY 32, MAIL_MAX_PER_CONNECTION 10;"
        f" changed: {results.get('settings') or 'none'}), a discarding SMTP sink that"
        " offers PIPELINING, a fresh stack per run. The stack a user runs includes its"
        " mail workers, so its capacity is measured with them running, on the same CPU:"
        f" wrk's closed loop on `POST /orders` ({CAPACITY_SECONDS} s) gives the CPUs the"
        " stack gets and the CPU per order and per mail, and the capacity is the order"
        " rate those CPUs cover with each order's mail. Orders cost more CPU in an open"
        f" loop, so {PROBE_SECONDS} s open-loop probes start there and step down (half way to the"
        " probe's mails/orders, 5% more) until the mail keeps up (at most half a"
        " second of orders waiting for their mail when the probe ends): the capacity with mail"
        " is the highest order rate probed at which both keep up. (wrk's closed-loop"
        " rate itself is not it: it keeps the app busy and leaves the workers only their"
        " scheduler share, so its mail falls behind by construction.) Then the open-loop"
        " generator offers that rate for the window; every order completes at once."
        " So mails/s >= orders/s holds at that rate nearly by construction: the figures"
        " that tell are the capacity with mail against the one without, the lag and the"
        " backlog over the full window."
        " Lag: the order.completed event to the worker's sent marker, written right"
        " after the server's 250; a mail still unsent after the drain counts with its"
        " wait so far.",
        "",
        "| workers | without mail (wrk) | closed loop orders/s (mails/s) | CPU per order / per mail:"
        " closed loop; last probe | capacity with mail | offered | orders/s | mails/s (window"
        " shifted by the median lag) | lag p50"
        " | lag p99 | lag max | backlog at end | trend (2nd half) | drained in | dup | dead"
        " | unsent |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---:"
        " | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in results["runs"]:
        c = run["capacity"]
        drain = "never" if run["drain_s"] is None else f"{run['drain_s']:.1f} s"
        probe = (c.get("probes") or [{}])[-1]
        tried = ", ".join(f"{p['rate']:,.0f}" for p in c.get("probes", []))
        lines.append(
            f"| {run['workers']} | {run.get('capacity_without_mail', 0):,.0f}"
            f" | {c['closed_loop_rps']:,.0f} ({c['closed_loop_mails_per_s']:,.0f})"
            f" | {c['stack_cpu_ms_per_order']:.3f} / {c['worker_cpu_ms_per_mail']:.3f} ms;"
            f" {probe.get('stack_cpu_ms_per_order', 0):.3f} /"
            f" {probe.get('worker_cpu_ms_per_mail', 0):.3f} ms"
            f" | **{c['rate']:,.0f}/s** (probed {tried}) | {run['offered_rps']:,.0f}/s"
            f" | {run['orders_per_s']:,.0f} | {run['mails_in_window_per_s']:,.0f}"
            f" ({run.get('mails_shifted_per_s', 0):,.0f})"
            f" | {run['lag_p50_s']:.2f} s | {run['lag_p99_s']:.2f} s | {run['lag_max_s']:.2f} s"
            f" | {run['backlog_at_end']:,} | {run['backlog_trend_per_s']:+,.0f}/s | {drain}"
            f" | {run['duplicates']} | {run['dead_letters']} | {run['unsent']} |"
        )
    rewrites = sum(run.get("aof_rewrites", 0) for run in results["runs"])
    lines += [
        "",
        "CPU during the window (user + system, process trees): "
        + "; ".join(
            f"{run['workers']} worker(s): {run['worker_cpu_ms_per_mail']:.3f} ms per mail in the"
            f" workers, {run['stack_cpu_ms_per_order']:.3f} ms per order in redis + app + nginx,"
            f" order p99 {run['accepted_p99_ms']:.0f} ms"
            for run in results["runs"]
        )
        + f". Each run starts right after an AOF rewrite; rewrites during the runs: {rewrites}.",
    ]
    lines += ["", "Targets (issue 16), per run:", ""]
    for run in results["runs"]:
        mails = run.get("mails_shifted_per_s", run["mails_in_window_per_s"])
        keeps_up = mails >= 0.99 * run["orders_per_s"]
        lines.append(
            f"- {run['workers']} worker(s): mails/s >= orders/s {_ok(keeps_up)}"
            f" ({mails:,.0f} vs {run['orders_per_s']:,.0f}, at the capacity with mail"
            f" {run['capacity']['rate']:,.0f}/s, against"
            f" {run.get('capacity_without_mail', 0):,.0f}/s without mail workers);"
            f" lag p99 <= {TARGET_LAG_P99_S:.0f} s {_ok(run['lag_p99_s'] <= TARGET_LAG_P99_S)};"
            f" no growing backlog {_ok(run['backlog_trend_per_s'] <= 0 or run['backlog_at_end'] < 100)};"
            f" 0 duplicates {_ok(run['duplicates'] == 0)};"
            f" 0 dead letters {_ok(run['dead_letters'] == 0)}"
        )
    return "\n".join(lines) + "\n"


def section(args: argparse.Namespace, out: Path) -> dict[str, str]:
    """loadtests/bench.py's hook: the section, measured with its own stack."""
    seconds = max(60, int(getattr(args, "mail_seconds", 60)))
    workers = int(getattr(args, "mail_workers", 0) or os.environ.get("MAIL_WORKERS") or 2)
    directory = out / "mail-lag"
    directory.mkdir(parents=True, exist_ok=True)
    # make bench's whole run is kept to about 11 minutes: it passes a shorter drain.
    drain = int(getattr(args, "mail_drain", 120))
    results = measure(seconds, sorted({1, workers}), drain, directory)
    (directory / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return {"title": TITLE, "markdown": markdown(results)}


def replace_section(report: str, body: str) -> str:
    """``report`` with its ``## TITLE`` section replaced by (or appended as) ``body``."""
    heading = f"## {TITLE}"
    start = report.find(heading)
    block = f"{heading}\n\n{body}"
    if start < 0:
        return report.rstrip("\n") + "\n\n" + block
    end = report.find("\n## ", start + len(heading))
    return report[:start] + block + ("" if end < 0 else report[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_mail_lag", description=__doc__)
    parser.add_argument("--seconds", type=int, default=60, help="seconds of orders per run (>= 60)")
    parser.add_argument(
        "--workers",
        type=int,
        default=env_int(os.environ, "MAIL_WORKERS", 2, 1, 99, error=SystemExit),
        help="the N of the second run (make run's MAIL_WORKERS)",
    )
    parser.add_argument("--drain", type=int, default=120, help="seconds allowed to drain")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="MAIL_X=value",
        help="a worker setting other than make run's default (repeatable)",
    )
    parser.add_argument("--only-n", action="store_true", help="skip the 1-worker run")
    parser.add_argument("--out", type=Path, default=REPORTS)
    args = parser.parse_args(argv)
    if args.seconds < 60:
        print("--seconds must be at least 60 (issue 16)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-mail-lag-") as tmp:
        settings = dict(item.split("=", 1) for item in args.set)
        counts = [args.workers] if args.only_n else sorted({1, args.workers})
        results = measure(args.seconds, counts, args.drain, Path(tmp), settings)
    (args.out / "bench-mail-lag.json").write_text(json.dumps(results, indent=2, default=str))
    body = markdown(results)
    (args.out / "BENCH-mail.md").write_text(f"## {TITLE}\n\n{body}")
    bench = args.out / "BENCH.md"
    if bench.exists():
        bench.write_text(replace_section(bench.read_text(), body))
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
