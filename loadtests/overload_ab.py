"""A/B of the overloaded stack in one run: two stacks that differ in settings (or in
the niceness of nginx against the app), short open-loop rounds at one fixed rate
alternating between them, and where the stack's CPU went.

    python -m loadtests.overload_ab --rate 24000 [--seconds 6] [--rounds 3]
        [--a-env UPSTREAM_MAX_CONNS=32] [--b-env ...] [--a-nginx-nice -10] [--b-nginx-nice -15]

``make bench``'s 10x level in small: each stack is loadtests/stack.py's (redis with
AOF always, 2 instances x 1 worker, nginx), with the bench's raised rate limits,
pinned to the stack CPUs; the open-loop generator (loadtests/openloop.py) runs on
the load CPUs and sends POST /orders at ``--rate`` for ``--seconds``. Per round:
goodput, refusals and their p99, accepted p99, and the CPU time each part of the
stack used (nginx, the app instances, redis, from /proc), per request offered; the
report is the median per side and B/A. Rounds alternate A first, then B first, so
drift on the shared box hits both alike. ``--sides 1`` measures A alone.
Bounded: 2 x rounds runs of ``seconds`` each, 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loadtests import rig
from loadtests.bench import cpu_by_part, stack_env, stack_parts
from loadtests.bench_data import provision
from loadtests.bench_drivers import orders_openloop_spec, orders_wrk, write_wrk_data
from loadtests.stack import LoadStack, launch


def app_refusals(stack: LoadStack) -> float:
    """Requests the app instances themselves refused so far (phoneshop_http_shed_total)."""
    total = 0.0
    for url in stack.stack.instance_urls:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as answer:
            for line in answer.read().decode().splitlines():
                if line.startswith("phoneshop_http_shed_total{"):
                    total += float(line.rsplit(" ", 1)[1])
    return total


def error_lines(stack: LoadStack) -> int:
    """Lines nginx has written to its error log so far."""
    with contextlib.suppress(OSError):
        return stack.stack.nginx.error_log.read_bytes().count(b"\n")
    return 0


@contextlib.contextmanager
def side(
    env: dict[str, str], split: rig.CpuSplit, folder: Path, nginx_nice: int | None
) -> Iterator[tuple[LoadStack, list[str], list[dict]]]:
    with launch(env=stack_env(folder / "web-access.log", env), instances=2, workers=1) as stack:
        if split.pinned:
            rig.pin_stack(
                [pid for pids in stack_parts(stack).values() for pid in pids],
                split.stack,
                front=stack_parts(stack)["nginx"],
            )
        if nginx_nice is not None:
            rig.renice(stack_parts(stack)["nginx"][0], nginx_nice)
        phone_ids, people = provision(stack, phones=20, customers=200)
        yield stack, phone_ids, people


def wrk_round(
    stack: LoadStack, data: Path, connections: int, seconds: float, split: rig.CpuSplit
) -> dict[str, Any]:
    """Closed loop, enough connections to keep the stack past its cap: steadier CPU
    figures than open loop on a busy box, where the generator itself may lag."""
    cpu_before, lines_before = cpu_by_part(stack), error_lines(stack)
    result = orders_wrk(
        stack, data, seconds=int(seconds), connections=connections, cpus=split.load or None
    )
    cpu_after, lines_after = cpu_by_part(stack), error_lines(stack)
    served = sum(n for status, n in result["statuses"].items() if 200 <= status < 300)
    total = max(1, result["requests"])
    row = {
        "requests_rps": result["rps"],
        "goodput_rps": result["ok_rps"],
        "refused_share": 1 - served / total,
        "p99_ms": result["p99_ms"],
        "error_log_lines": lines_after - lines_before,
    }
    for name in cpu_before:
        row[f"{name}_us_per_request"] = (cpu_after[name] - cpu_before[name]) * 1e6 / total
    return row


def one_round(
    stack: LoadStack,
    phone_ids: list[str],
    people: list[dict],
    rate: float,
    seconds: float,
    split: rig.CpuSplit,
    out: Path,
) -> dict[str, Any]:
    phases = [{"name": "level", "rate": rate, "seconds": seconds}]
    spec = orders_openloop_spec(stack, people, phone_ids, phases)
    shed_before = app_refusals(stack)
    cpu_before, lines_before, began = cpu_by_part(stack), error_lines(stack), time.monotonic()
    raw = rig.run_openloop(spec, out, split.load or None)
    wall = time.monotonic() - began
    cpu_after, lines_after = cpu_by_part(stack), error_lines(stack)
    shed = app_refusals(stack) - shed_before
    figures = rig.phase_figures(raw, phases)[0]
    sent = max(1, len(raw["rows"]))
    row = {
        "offered_rps": figures["offered_rps"],
        "valid": figures["valid"],
        "goodput_rps": figures["goodput_rps"],
        "refused_rps": figures["refused"] / seconds,
        "refused_p99_ms": figures["refused_p99_ms"],
        "accepted_p99_ms": figures["accepted_p99_ms"],
        "failures": figures["failures"],
        "app_refused_rps": shed / seconds,
        "generator_lag_p99_ms": figures["generator_lag_p99_ms"],
        "error_log_lines": lines_after - lines_before,
        "connections_opened": raw["connections_opened"],
        "stack_cpu_share": sum(cpu_after.values()) / wall - sum(cpu_before.values()) / wall,
    }
    for name in cpu_before:
        row[f"{name}_us_per_request"] = (cpu_after[name] - cpu_before[name]) * 1e6 / sent
    return row


@contextlib.contextmanager
def nothing() -> Iterator[None]:
    yield


@contextlib.contextmanager
def perf(stack: LoadStack, out: Path, seconds: float) -> Iterator[None]:
    """``perf record -g`` of nginx's worker process(es) while the block runs."""
    workers = [
        p
        for p in rig.process_tree(stack_parts(stack)["nginx"][0])
        if p != stack_parts(stack)["nginx"][0]
    ]
    recorder = subprocess.Popen(
        [
            "perf",
            "record",
            "-g",
            "-o",
            str(out),
            "-p",
            ",".join(map(str, workers)),
            "--",
            "sleep",
            str(seconds),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        recorder.wait(timeout=seconds + 60)


def parse_env(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.overload_ab", description=__doc__)
    parser.add_argument("--rate", type=float, required=True, help="POST /orders per second")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--wrk", type=int, default=0, help="closed loop: wrk with this many connections instead"
    )
    parser.add_argument("--sides", type=int, choices=(1, 2), default=2)
    parser.add_argument("--a-env", action="append", default=[], help="KEY=VALUE for side A")
    parser.add_argument("--b-env", action="append", default=[], help="KEY=VALUE for side B")
    parser.add_argument(
        "--perf", type=Path, default=None, help="perf record nginx's worker during A's first round"
    )
    parser.add_argument(
        "--a-nginx-nice",
        type=int,
        default=None,
        help="nginx's niceness on A (default: BENCH_NGINX_NICE's)",
    )
    parser.add_argument("--b-nginx-nice", type=int, default=None, help="nginx's niceness on B")
    args = parser.parse_args(argv)
    split = rig.cpu_split()
    labels = ("a", "b")[: args.sides]
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    with (
        tempfile.TemporaryDirectory(prefix="phoneshop-overload-ab-") as temp,
        contextlib.ExitStack() as running,
    ):
        folder = Path(temp)
        sides = {}
        for label in labels:
            (folder / label).mkdir()
            env = parse_env(getattr(args, f"{label}_env"))
            nice = getattr(args, f"{label}_nginx_nice")
            sides[label] = running.enter_context(side(env, split, folder / label, nice))
        for label in labels:  # warm-up, not counted
            one_round(*sides[label], args.rate / 4, 2.0, split, folder / label)
        for round_ in range(args.rounds):
            for label in labels if round_ % 2 == 0 else labels[::-1]:
                profiling = args.perf is not None and label == "a" and not rows["a"]
                with perf(sides[label][0], args.perf, args.seconds) if profiling else nothing():
                    if args.wrk:
                        stack, phones, people = sides[label]
                        data = folder / label / "wrk-data.lua"
                        write_wrk_data(data, phones, people)
                        row = wrk_round(stack, data, args.wrk, args.seconds, split)
                    else:
                        row = one_round(
                            *sides[label], args.rate, args.seconds, split, folder / label
                        )
                rows[label].append(row)
                print(label, json.dumps({k: round(v, 1) for k, v in row.items()}), flush=True)
    report: dict[str, Any] = {"split": split.describe(), "rate": args.rate, "rounds": rows}
    for key in rows[labels[0]][0]:
        if key == "valid":
            continue
        medians = {label: statistics.median(r[key] for r in rows[label]) for label in labels}
        if len(labels) == 2:
            medians["b_over_a"] = medians["b"] / medians["a"] if medians["a"] else 0.0
        report[key] = medians
    print(json.dumps({k: v for k, v in report.items() if k != "rounds"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
