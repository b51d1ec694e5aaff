"""``python -m loadtests.bench`` (``make bench``): measure, in one run on this machine,
and write ``loadtests/reports/BENCH.md`` plus ``bench.png`` (``--publish DIR`` copies
both there too: ``make bench`` publishes to docs/, where the repository keeps them).

One fresh stack (loadtests/stack.py: redis with AOF ``appendfsync always``,
2 gunicorn instances x 1 worker, nginx), with nginx's rate limits raised so
they do not answer instead of the app, pinned to the stack CPUs; every load
generator runs on the other CPUs (loadtests/rig.py: STACK_CPUS / LOAD_CPUS).
Then:

1. ceilings with wrk (closed loop): ``GET /bench/hello``, ``GET /phones?page=1``
   and ``POST /orders`` (loadtests/wrk/orders.lua, 64 and 256 connections)
   through nginx. The better orders rate is the capacity; orders ÷ hello at 64
   connections is P1;
2. the overload levels, open loop (loadtests/openloop.py): half the capacity,
   1x, 3x, 10x, then half again for the recovery, in one continuous run; per
   level the rate actually offered (INVALID when > 5% short), accepted
   p50/p99, goodput, refused p99, status mix, failures; then whether every
   process is still up;
3. a py-spy profile of one worker during ``POST /orders``;
4. ceiling B: ``redis-benchmark`` running the real ``place_order`` script;
5. Redis memory per stored order and per Idempotency-Key record as the real scripts
   store them, on one redis-server and on a 3-primary cluster, at 100k and 1M orders
   (loadtests/order_memory.py); then, once the main stack has stopped, the list cost
   (loadtests/list_ab.py): stacks with 1k and with 1M stored rows up at once, for this
   tree and for the baseline ref (each bulk-loaded by its own checkout's
   loadtests/bench_data.py), alternating wrk rounds, throughput and CPU per answer;
6. A/B comparisons, each in this run: two stacks that differ in one setting,
   wrk rounds alternating between them, orders/s and CPU per request from /proc
   (:data:`AB_COMPARISONS`);
7. extra sections from their own modules (:data:`EXTRA_SECTIONS`): the mail lag, the
   data tier on 1 and on 3 primaries (loadtests/bench_tier.py: the uniform workload and the
   hot ones of docs/escrow.md section 9, ``--tier-workloads``), and POST /orders on one
   redis-server against the baseline ref (loadtests/ab_refs.py, issue 11's item 3).

Targets are reported, never asserted: a benchmark is not a test. Runs in about
15 minutes, the mail-lag section's 5, the list cost's 2.5 (four stacks, two of them
bulk-loaded with 1M rows), the data tier's 1 (and 2 to 4 more for its hot workloads,
by the box's load) and the baseline A/B's 1 included;
everything goes to 127.0.0.1 and every step is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.ops.instances import ROOT
from loadtests import ab_refs, bench_mail_lag, bench_tier, list_ab, order_memory, rig
from loadtests.bench_data import provision
from loadtests.bench_drivers import (
    BENCH_LIMITS,
    ceiling_b,
    orders_openloop_spec,
    orders_wrk,
    profile_orders,
    write_wrk_data,
    wrk,
)
from loadtests.bench_plot import plot
from loadtests.bench_report import render
from loadtests.stack import LoadStack, launch

REPORTS = ROOT / "loadtests" / "reports"

# The overload levels: (name, multiple of the capacity, seconds), run back to back.
LEVELS = (
    ("half", 0.5, 8.0),
    ("1x", 1.0, 8.0),
    ("3x", 3.0, 10.0),
    ("10x", 10.0, 10.0),
    ("recovery", 0.5, 10.0),
)


@dataclass(frozen=True)
class Comparison:
    """Two stacks that differ only in ``a_env`` / ``b_env``, measured in alternating rounds."""

    name: str
    a_label: str
    a_env: dict[str, str]
    b_label: str
    b_env: dict[str, str]
    # Keep a live-events WebSocket open on each instance of A (its hubs read every event).
    a_sockets: bool = False
    # wrk's connections: 64 is the capacity measurement; many more keep nginx
    # refusing most requests (UPSTREAM_MAX_CONNS x instances = 64 in progress).
    connections: int = 64


# Each gain of issue 12's item 3 as an A/B in one run. Add a row per switch.
AB_COMPARISONS: list[Comparison] = [
    Comparison(
        name="per-request metrics and access log (app/metrics.py, app/logs.py)",
        a_label="OBSERVE_BATCHING=0: every metric update and access line written at once, "
        "the log file checked for rotation before each line (as before)",
        a_env={"OBSERVE_BATCHING": "0"},
        b_label="OBSERVE_BATCHING=1: written once per event-loop turn, rotation checked "
        "once a second",
        b_env={"OBSERVE_BATCHING": "1"},
    ),
    Comparison(
        name="event hub with no socket listening (app/events/hub.py)",
        a_label="one /orders/events socket open on each instance: the hub reads and parses "
        "every event (what it did before whether or not a socket listened)",
        a_env={},
        b_label="no socket: the hub idles",
        b_env={},
        a_sockets=True,
    ),
    Comparison(
        name="nginx refusing the overflow (nginx/nginx.conf.template), wrk with 512 connections: "
        "~9 of 10 requests refused by nginx at UPSTREAM_MAX_CONNS",
        a_label="NGINX_ACCESS_LOG_BUFFER=off, NGINX_PROXY_ERROR_LOG_LEVEL=error: a write per "
        'access line, and a "no live upstreams" error line per refusal (as before)',
        a_env={"NGINX_ACCESS_LOG_BUFFER": "off", "NGINX_PROXY_ERROR_LOG_LEVEL": "error"},
        b_label="the defaults: access lines written 64k at a time, no error line per refusal",
        b_env={},
        connections=512,
    ),
    Comparison(
        name="the app's limit floor behind nginx's cap (app/overload.py), wrk with 512 connections",
        a_label="OVERLOAD_MIN_LIMIT=4 (as before): the limit may drop below the 32 nginx sends "
        "an instance; each refusal frees a slot nginx refills at once",
        a_env={"OVERLOAD_MIN_LIMIT": "4"},
        b_label="OVERLOAD_MIN_LIMIT=40 (the default): never below what nginx's cap sends",
        b_env={},
        connections=512,
    ),
]

# Report sections of their own modules: a callable (args, the run's folder) ->
# {"title": ..., "markdown": ...}, run after the main stack has stopped.
EXTRA_SECTIONS: list[Callable[[argparse.Namespace, Path], dict[str, str]]] = [
    bench_mail_lag.section,
    bench_tier.section,
    ab_refs.section,
]


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[bench {stamp}] {message}", flush=True)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    log(f"{name} ...")
    began = time.monotonic()
    yield
    log(f"{name}: {time.monotonic() - began:.1f}s")


# ---- the stack's processes --------------------------------------------------------------


def stack_env(access_log: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The bench stack's environment: nginx's limits out of the way, and the app's
    access log written to a file, as ``make run`` does."""
    return {**BENCH_LIMITS, "WEB_ACCESS_LOG": str(access_log), **(extra or {})}


def stack_pids(stack: LoadStack) -> list[int]:
    """The top process of each part of the stack: redis, each gunicorn master, nginx."""
    procs = [
        stack.stack.redis.proc,
        *(i.proc for i in stack.stack.instances),
        stack.stack.nginx.proc,
    ]
    return [p.pid for p in procs if p is not None]


def stack_parts(stack: LoadStack) -> dict[str, list[int]]:
    """The top pid of each part of the stack: nginx, the app instances, redis."""
    procs = {
        "nginx": [stack.stack.nginx.proc],
        "app": [i.proc for i in stack.stack.instances],
        "redis": [stack.stack.redis.proc],
    }
    return {name: [p.pid for p in ps if p is not None] for name, ps in procs.items()}


def cpu_by_part(stack: LoadStack) -> dict[str, float]:
    """CPU seconds used so far by each part of the stack (its whole process tree)."""
    return {name: rig.cpu_seconds(pids) for name, pids in stack_parts(stack).items()}


def costed(stack: LoadStack, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measure()``'s result plus the stack CPU it cost, per part, in µs per answer
    served (2xx): what nginx, the app and redis spend on each request that
    counts, refusals included in the price."""
    before, began = cpu_by_part(stack), time.monotonic()
    result = measure()
    wall = time.monotonic() - began
    after = cpu_by_part(stack)
    served = sum(n for status, n in result["statuses"].items() if 200 <= status < 300)
    used = {name: after[name] - before[name] for name in before}
    result["cpu_us"] = {name: seconds * 1e6 / max(served, 1) for name, seconds in used.items()}
    # Share of one CPU the stack used meanwhile: near 1 means the stack CPU was the limit.
    result["stack_cpu_share"] = sum(used.values()) / wall if wall else 0.0
    return result


def pin(stack: LoadStack, split: rig.CpuSplit) -> dict[str, Any]:
    if not split.pinned:
        return {"cpus": "", "threads": 0, "checked": 0, "stray": []}
    nginx = stack.stack.nginx.proc
    return rig.pin_stack(stack_pids(stack), split.stack, front=[nginx.pid] if nginx else [])


def processes_up(stack: LoadStack, workers_before: list[int]) -> dict[str, Any]:
    """Is every process of the stack still running, with the same app workers?"""
    down = []
    if stack.stack.redis.proc is None or stack.stack.redis.proc.poll() is not None:
        down.append("redis")
    for instance in stack.stack.instances:
        if not instance.running:
            down.append(f"instance {instance.index}")
    if stack.stack.nginx.proc is None or stack.stack.nginx.proc.poll() is not None:
        down.append("nginx")
    workers_after = stack.app_pids
    replaced = sorted(set(workers_before) - set(workers_after))
    if replaced:
        down.append(f"app workers {replaced} replaced")
    detail = (
        f"redis, {len(stack.stack.instances)} instances ({len(workers_after)} workers, none "
        "replaced) and nginx all up"
        if not down
        else "down or restarted: " + ", ".join(down)
    )
    return {"all_up": not down, "down": down, "detail": detail}


# ---- the overload levels -------------------------------------------------------------------


def overload_levels(
    stack: LoadStack,
    people: list[dict],
    phone_ids: list[str],
    capacity: float,
    split: rig.CpuSplit,
    out: Path,
    scale: float = 1.0,
) -> dict[str, Any]:
    phases = [
        {"name": name, "rate": round(capacity * factor, 1), "seconds": seconds * scale}
        for name, factor, seconds in LEVELS
    ]
    spec = orders_openloop_spec(stack, people, phone_ids, phases)
    workers_before = stack.app_pids
    with sampling(stack, split) as samples:
        raw = rig.run_openloop(spec, out, split.load or None)
    levels = rig.phase_figures(raw, phases)
    per_phase = rig.cpu_per_phase(samples, raw["epoch"], phases, raw["phase_starts"])
    for row, used, phase in zip(levels, per_phase, phases, strict=True):
        parts = {name: used[name] for name in ("nginx", "app", "redis")}
        stack_seconds = sum(parts.values())
        requests = max(1, row["answered"])
        cpu_time = phase["seconds"] * max(1, len(split.stack))
        row["cpu"] = {
            # Shares of the stack CPUs: the stack's processes, the kernel's softirq
            # work (loopback TCP, mostly the stack's), and whatever else ran there.
            "stack_share": stack_seconds / cpu_time,
            "softirq_share": used["cpus_softirq"] / cpu_time,
            "others_share": max(0.0, used["cpus_busy"] - used["cpus_softirq"] - stack_seconds)
            / cpu_time,
            **{f"{name}_us": seconds * 1e6 / requests for name, seconds in parts.items()},
        }
    windows = rig.timeline(raw, [p["name"] for p in phases])
    half = next(row for row in levels if row["phase"] == "half")
    spans = [
        (start, start + p["seconds"]) for start, p in zip(raw["phase_starts"], phases, strict=True)
    ]
    return {
        "capacity_rps": capacity,
        "levels": levels,
        "timeline": windows,
        "phase_spans": spans,
        "recovery_s": rig.recovery_seconds(windows, "recovery", half["accepted_p99_ms"]),
        "processes": processes_up(stack, workers_before),
        "connect_errors": raw["connect_errors"],
        "connections_opened": raw["connections_opened"],
        "waited_for_connection": raw["waited_for_connection"],
        "max_connections": spec["max_connections"],
        "generator_cpu_share": raw["cpu_s"] / raw["wall_s"] if raw["wall_s"] else 0.0,
    }


@contextlib.contextmanager
def sampling(stack: LoadStack, split: rig.CpuSplit, every: float = 0.5) -> Iterator[list]:
    """Every ``every`` s while the block runs: the wall time, each part's CPU seconds
    so far, and how long the stack CPUs have been busy (whoever ran on them) and in
    softirq."""
    samples: list[tuple[float, dict[str, float]]] = []
    done = threading.Event()

    def sample() -> None:
        samples.append((time.time(), {**cpu_by_part(stack), **rig.cpu_times(split.stack)}))

    def loop() -> None:
        while not done.wait(every):
            sample()

    sample()
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join()
        sample()


# ---- A/B --------------------------------------------------------------------------------


@contextlib.contextmanager
def nothing() -> Iterator[None]:
    yield


def blocked_readers(stack: LoadStack) -> int:
    """Redis clients blocked in a read now (an event hub in XREAD BLOCK)."""
    clients = stack.stack.redis.cli("CLIENT", "LIST")
    return sum(1 for line in clients.splitlines() if " flags=b " in f" {line} ")


@contextlib.contextmanager
def listening(stack: LoadStack, split: rig.CpuSplit, seconds: float) -> Iterator[None]:
    """A live-events socket on each instance of ``stack`` (loadtests/ws_listen.py, on
    the load CPUs) until the block ends; waits until every hub is reading."""
    command = [
        sys.executable,
        "-m",
        "loadtests.ws_listen",
        str(seconds),
        stack.admin_token,
        *stack.stack.instance_urls,
    ]
    listener = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, preexec_fn=rig.pinned_to(split.load)
    )
    try:
        deadline = time.monotonic() + 15
        while blocked_readers(stack) < len(stack.stack.instances) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the hubs' XREAD, not waiting for time to pass
        yield
    finally:
        listener.terminate()
        listener.wait(timeout=15)


def ab_compare(
    comparison: Comparison,
    split: rig.CpuSplit,
    out: Path,
    *,
    rounds: int,
    seconds: int,
) -> dict[str, Any]:
    """Start both stacks (pinned to the same stack CPUs), provision each, then
    alternate wrk rounds of POST /orders between them, A first in odd rounds and B
    first in even ones, so that drift on the shared box hits both alike."""
    rates: dict[str, list[float]] = {"a": [], "b": []}
    cpu: dict[str, list[float]] = {"a": [], "b": []}
    app_cpu: dict[str, list[float]] = {"a": [], "b": []}
    nginx_cpu: dict[str, list[float]] = {"a": [], "b": []}
    with (
        tempfile.TemporaryDirectory(prefix="phoneshop-ab-") as logs,
        launch(env=stack_env(Path(logs) / "a.log", comparison.a_env), instances=2, workers=1) as a,
        launch(env=stack_env(Path(logs) / "b.log", comparison.b_env), instances=2, workers=1) as b,
    ):
        data = {}
        for label, stack in (("a", a), ("b", b)):
            pin(stack, split)
            phone_ids, people = provision(stack, phones=20, customers=200)
            data[label] = out / f"ab-{label}.lua"
            write_wrk_data(data[label], phone_ids, people)
            orders_wrk(stack, data[label], seconds=2, cpus=split.load or None)
        with listening(a, split, rounds * seconds * 2 + 60) if comparison.a_sockets else nothing():
            for round_ in range(rounds):
                order = (("a", a), ("b", b)) if round_ % 2 == 0 else (("b", b), ("a", a))
                for label, stack in order:
                    before = cpu_by_part(stack)
                    row = orders_wrk(
                        stack,
                        data[label],
                        seconds=seconds,
                        connections=comparison.connections,
                        cpus=split.load or None,
                    )
                    used = {k: v - before[k] for k, v in cpu_by_part(stack).items()}
                    per = 1e6 / row["requests"] if row["requests"] else 0.0
                    rates[label].append(row["ok_rps"])
                    cpu[label].append(sum(used.values()) * per)
                    app_cpu[label].append(used["app"] * per)
                    nginx_cpu[label].append(used["nginx"] * per)
    a_rps, b_rps = statistics.median(rates["a"]), statistics.median(rates["b"])
    a_cpu, b_cpu = statistics.median(cpu["a"]), statistics.median(cpu["b"])
    a_app, b_app = statistics.median(app_cpu["a"]), statistics.median(app_cpu["b"])
    a_nginx, b_nginx = statistics.median(nginx_cpu["a"]), statistics.median(nginx_cpu["b"])
    return {
        "connections": comparison.connections,
        "a_nginx_cpu_us": a_nginx,
        "b_nginx_cpu_us": b_nginx,
        "nginx_cpu_gain": a_nginx / b_nginx if b_nginx else 0.0,
        "name": comparison.name,
        "a_label": comparison.a_label,
        "b_label": comparison.b_label,
        "a_rounds": rates["a"],
        "b_rounds": rates["b"],
        "a_rps": a_rps,
        "b_rps": b_rps,
        "gain": b_rps / a_rps if a_rps else 0.0,
        "a_cpu_us": a_cpu,
        "b_cpu_us": b_cpu,
        "a_cpu_rounds": cpu["a"],
        "b_cpu_rounds": cpu["b"],
        "cpu_gain": a_cpu / b_cpu if b_cpu else 0.0,
        "a_app_cpu_us": a_app,
        "b_app_cpu_us": b_app,
        "a_app_cpu_rounds": app_cpu["a"],
        "b_app_cpu_rounds": app_cpu["b"],
        "app_cpu_gain": a_app / b_app if b_app else 0.0,
    }


# ---- list cost ------------------------------------------------------------------------------


def list_costs(args: argparse.Namespace, split: rig.CpuSplit) -> dict[str, Any]:
    """loadtests/list_ab.py: this tree's stacks with 1k and with ``args.rows`` rows, and the
    baseline's (its own checkout and loader), all up at once; this tree's alone when the
    baseline cannot be checked out here."""
    refs = [args.baseline_ref, "."] if args.baseline_ref not in ("", ".") else ["."]
    measure = functools.partial(
        list_ab.compare,
        rows=args.rows,
        rounds=args.list_rounds,
        seconds=args.list_seconds,
        split=split,
        log=log,
    )
    try:
        return measure(refs)
    except subprocess.CalledProcessError as error:  # a clone without the baseline commit
        log(f"list cost: no checkout of {args.baseline_ref} ({error.stderr!r}): this tree only")
        return measure(["."])


# ---- the run ----------------------------------------------------------------------------------


def measured_section(
    section: Callable[[argparse.Namespace, Path], dict[str, str]],
    args: argparse.Namespace,
    out: Path,
) -> dict[str, str]:
    """The section, or what stopped it: the sections run last, and one that fails (a
    cluster that did not form on a busy box) must not lose the run's other figures."""
    try:
        return section(args, out)
    except Exception as error:  # any failure: it is reported in BENCH.md instead
        log(f"section {section.__module__} failed: {error!r}")
        return {"title": section.__module__, "markdown": f"Not measured: `{error!r}`.\n"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out / "bench"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    began = time.monotonic()
    load_before = os.getloadavg()[0]
    split = rig.cpu_split()
    load_cpus = split.load or None
    log(f"rig: {split.describe()}")
    own_cpus = os.sched_getaffinity(0)
    if split.pinned:
        # This process encodes the bulk rows and drives every step: it is load too.
        os.sched_setaffinity(0, split.load)
        if rig.load_priority():
            os.setpriority(os.PRIO_PROCESS, 0, rig.load_priority())
    results: dict[str, Any] = {"sections": []}
    with (
        tempfile.TemporaryDirectory(prefix="phoneshop-bench-") as logs,
        launch(env=stack_env(Path(logs) / "web-access.log"), instances=2, workers=1) as stack,
    ):
        pinning = pin(stack, split)
        log(f"stack up: {stack.http_url}; pinned {pinning['threads']} threads")
        with step("provision"):
            phone_ids, people = provision(stack, phones=20, customers=200)
            data = out / "wrk-data.lua"
            write_wrk_data(data, phone_ids, people)
        with step("warm-up"):
            wrk(f"{stack.http_url}/bench/hello", seconds=2, cpus=load_cpus)
            orders_wrk(stack, data, seconds=2, cpus=load_cpus)
        secs = args.seconds
        with step("hello through nginx"):
            results["hello"] = costed(
                stack, lambda: wrk(f"{stack.http_url}/bench/hello", seconds=secs, cpus=load_cpus)
            )
        with step("GET /phones?page=1"):
            results["phones"] = wrk(f"{stack.http_url}/phones?page=1", seconds=secs, cpus=load_cpus)
        with step("POST /orders: capacity"):
            results["orders"] = costed(
                stack, lambda: orders_wrk(stack, data, seconds=secs, cpus=load_cpus)
            )
            # More connections let Redis fold more scripts into one fsync: the
            # capacity is the better of the two.
            results["orders_256"] = orders_wrk(
                stack, data, seconds=secs, connections=256, cpus=load_cpus
            )
        capacity = max(results["orders"]["ok_rps"], results["orders_256"]["ok_rps"], 10.0)
        with step(f"overload levels, open loop, capacity {capacity:,.0f}/s"):
            results["overload"] = overload_levels(
                stack, people, phone_ids, capacity, split, out, args.level_scale
            )
        results["overload"]["split"] = split.describe()
        results["overload"]["pinning"] = pinning
        for row in results["overload"]["levels"]:
            log(
                f"  {row['phase']}: offered {row['offered_rps']:,.0f}/{row['planned_rps']:,.0f} "
                f"{'valid' if row['valid'] else 'INVALID'}, goodput {row['goodput_rps']:,.0f}/s, "
                f"p99 {row['accepted_p99_ms']:.0f} ms, refused {row['refused']} "
                f"(p99 {row['refused_p99_ms']:.0f} ms), failures {row['failures']}"
            )
        with step("profile"):
            results["profile"] = profile_orders(stack, data, out, cpus=load_cpus)
        # ceiling B after the overload: redis-benchmark's __rand_int__ orders are not
        # real orders (the audit could not read them).
        with step("ceiling B"):
            results["ceiling_b"] = ceiling_b(
                stack, people[0]["id"], phone_ids[0], args.scripts, cpus=load_cpus
            )
        with step("ceiling B, appendfsync everysec (for comparison)"):
            stack.stack.redis.cli("CONFIG", "SET", "appendfsync", "everysec")
            results["ceiling_b_everysec"] = ceiling_b(
                stack, people[0]["id"], phone_ids[0], args.scripts, cpus=load_cpus
            )
            stack.stack.redis.cli("CONFIG", "SET", "appendfsync", "always")

        with step("memory per order (own servers, the real scripts)"):
            results["memory"] = order_memory.bench_figures(
                order_memory.run(out / "memory", args.memory_orders)
            )
    with step("list cost: 1k and 1M rows side by side, this tree and the baseline"):
        results["lists_ab"] = list_costs(args, split)
        results["lists"] = list_ab.bench_lists(results["lists_ab"], ".")
    results["ab"] = []
    for comparison in AB_COMPARISONS:
        with step(f"A/B: {comparison.name}"):
            results["ab"].append(
                ab_compare(comparison, split, out, rounds=args.ab_rounds, seconds=args.ab_seconds)
            )
    # Sections make their own split (loadtests/rig.py) from what this process may use.
    os.sched_setaffinity(0, own_cpus)
    for section in EXTRA_SECTIONS:
        with step(f"section {section.__module__}"):
            results["sections"].append(measured_section(section, args, out))
    results["environment"] = {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_before": load_before,
        "duration_s": time.monotonic() - began,
        "machine": f"{os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}",
        "instances": 2,
        "workers": 1,
        "limits": ", ".join(f"{k}={v}" for k, v in BENCH_LIMITS.items()),
        "wrk": f"{len(split.load) or 2} thread(s), 64 connections, {args.seconds} s per measurement",
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    plot(results, args.out / "bench.png")
    (args.out / "BENCH.md").write_text(render(results))
    return results


def publish(reports: Path, target: Path) -> None:
    """Copy BENCH.md and bench.png where the repository keeps them."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("BENCH.md", "bench.png"):
        shutil.copyfile(reports / name, target / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__)
    parser.add_argument("--out", type=Path, default=REPORTS)
    parser.add_argument(
        "--publish", type=Path, default=None, help="also copy BENCH.md and bench.png here"
    )
    parser.add_argument("--seconds", type=int, default=6, help="wrk seconds per measurement")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the large list")
    parser.add_argument("--scripts", type=int, default=25_000, help="redis-benchmark calls")
    parser.add_argument(
        "--memory-orders",
        type=int,
        default=order_memory.BENCH_ORDERS,
        help="orders the memory section writes per tier (measured at a tenth and at all)",
    )
    parser.add_argument(
        "--level-scale", type=float, default=1.0, help="scale the overload levels' lengths"
    )
    parser.add_argument(
        "--mail-drain",
        type=int,
        default=30,
        help="seconds the mail-lag section waits for its backlog to drain (its own default: 120)",
    )
    parser.add_argument(
        "--list-rounds", type=int, default=4, help="wrk rounds per list-cost stack and path"
    )
    parser.add_argument("--list-seconds", type=int, default=3, help="seconds per list-cost round")
    parser.add_argument("--ab-rounds", type=int, default=4, help="wrk rounds per A/B side")
    parser.add_argument("--ab-seconds", type=int, default=4, help="seconds per A/B round")
    parser.add_argument(
        "--baseline-ref",
        default=os.environ.get("BENCH_BASELINE_REF", ab_refs.BASELINE_REF),
        help="side A of the one-redis-server A/B and of the list cost (BENCH_BASELINE_REF; "
        "'.' or '' measures this tree's list cost alone)",
    )
    parser.add_argument(
        "--tier-orders", type=int, default=2000, help="orders recorded per shard count"
    )
    bench_tier.add_workload_options(parser)
    args = parser.parse_args(argv)
    for binary in ("wrk", "redis-benchmark", "redis-cli"):
        if shutil.which(binary) is None:
            print(f"{binary} is not installed: run `make setup`", file=sys.stderr)
            return 2
    try:
        run(args)
    except urllib.error.URLError as error:
        print(f"bench: the stack did not answer: {error}", file=sys.stderr)
        return 1
    log(f"wrote {args.out / 'BENCH.md'} and {args.out / 'bench.png'}")
    if args.publish is not None:
        publish(args.out, args.publish)
        log(f"published to {args.publish}")
    print((args.out / "BENCH.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
