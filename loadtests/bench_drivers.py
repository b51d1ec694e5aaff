"""The bench's drivers: wrk (closed loop, for ceilings), py-spy on one worker,
and redis-benchmark running the real place_order script (ceiling B). Each
generator runs on the load CPUs (``cpus``; None: wherever the OS puts it)."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from app import keys
from app.ops.instances import ROOT
from app.orders.idempotency import record_place
from app.orders.service import place_order_keys
from app.partitions import partition_of
from app.scripts import load_source
from app.vocabulary import COMPLETED
from loadtests.rig import pinned_to
from loadtests.stack import LoadStack

WRK_DIR = ROOT / "loadtests" / "wrk"

# nginx limits for the bench: high enough that they never answer instead of the app.
BENCH_LIMITS = {
    "LIMIT_WRITE_RATE": "1000000r/s",
    "LIMIT_WRITE_BURST": "1000000",
    "LIMIT_READ_RATE": "1000000r/s",
    "LIMIT_READ_BURST": "1000000",
    "LIMIT_CONN": "60000",
}

# ---- wrk ------------------------------------------------------------------------------------


def wrk(
    url: str,
    *,
    script: str = "hello.lua",
    script_args: list[str] | None = None,
    seconds: int = 10,
    connections: int = 64,
    headers: dict[str, str] | None = None,
    cpus: Iterable[int] | None = None,
) -> dict[str, Any]:
    """wrk on ``cpus`` (one thread per CPU), closed loop: the ceiling of ``url``."""
    threads = max(1, len(list(cpus or ())) or 2)
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s"]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    command += ["-s", str(WRK_DIR / script), url]
    if script_args:
        command += ["--", *script_args]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        preexec_fn=pinned_to(cpus),
    )
    out = done.stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    statuses = re.search(r"wrk-statuses (\{.*\})", out)
    latency = re.search(r"wrk-latency (\{.*\})", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if not (match and statuses and latency):
        raise RuntimeError(f"wrk printed no result:\n{out}\n{done.stderr}")
    counts = {int(k): v for k, v in json.loads(statuses.group(1)).items()}
    lat = json.loads(latency.group(1))
    total = sum(counts.values())
    ok = sum(v for k, v in counts.items() if 200 <= k < 300)
    rps = float(match.group(1))
    return {
        "rps": rps,
        "ok_rps": rps * ok / total if total else 0.0,
        "requests": total,
        "statuses": counts,
        "p50_ms": lat["p50"] / 1000,
        "p95_ms": lat["p95"] / 1000,
        "p99_ms": lat["p99"] / 1000,
        "socket_errors": errors.group(1).strip() if errors else "",
        "connections": connections,
        "seconds": seconds,
    }


def write_wrk_data(path: Path, phone_ids: list[str], people: list[dict]) -> None:
    tokens = ",".join(f'"{p["token"]}"' for p in people)
    phones = ",".join(f'"{p}"' for p in phone_ids)
    path.write_text(f"return {{tokens = {{{tokens}}}, phones = {{{phones}}}}}\n")


def orders_wrk(stack: LoadStack, data: Path, **kwargs: Any) -> dict[str, Any]:
    delay = kwargs.pop("delay_ms", 0)
    args = [str(data), secrets.token_hex(6), str(delay)]
    return wrk(f"{stack.http_url}/orders", script="orders.lua", script_args=args, **kwargs)


# ---- py-spy ---------------------------------------------------------------------------------


def orders_openloop_spec(
    stack: LoadStack,
    people: list[dict],
    phone_ids: list[str],
    phases: list[dict[str, Any]],
    warm_connections: int = 256,
) -> dict[str, Any]:
    """loadtests/openloop.py's spec for POST /orders through the stack's nginx: each
    person's token in turn, one of ``phone_ids`` per order, ``phases`` of rate x seconds."""
    return {
        "host": "127.0.0.1",
        "port": stack.stack.nginx.config.http_port,
        "kind": "orders",
        "path": "/orders",
        "tokens": [p["token"] for p in people],
        "phones": phone_ids,
        "nonce": secrets.token_hex(4),
        "timeout_s": 10.0,
        "connect_timeout_s": 2.0,
        "max_connections": 3000,
        "warm_connections": warm_connections,
        "phases": phases,
    }


def profile_orders(
    stack: LoadStack,
    data: Path,
    out: Path,
    seconds: int = 8,
    cpus: Iterable[int] | None = None,
) -> dict[str, Any]:
    """py-spy on one worker while wrk drives POST /orders; top frames by self and total time."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    pids = stack.app_pids
    if not pids or not Path(py_spy).exists():
        return {"error": "py-spy or the worker pids are not available"}
    raw = out / "profile-orders.txt"
    args = [str(data), secrets.token_hex(6), "0"]
    command = ["wrk", "-t1", "-c64", f"-d{seconds + 3}s", "-s", str(WRK_DIR / "orders.lua")]
    load = subprocess.Popen(
        [*command, f"{stack.http_url}/orders", "--", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=pinned_to(cpus),
    )
    try:
        # A warm-up inside wrk's fixed window (seconds + 3): the profile leaves out
        # the ramp (connections opening). A delay of the measurement, not a wait.
        time.sleep(1.5)
        spy = [
            py_spy,
            "record",
            "-p",
            str(pids[0]),
            "-d",
            str(seconds),
            "-r",
            "250",
            "--nonblocking",
        ]
        subprocess.run(
            [*spy, "-f", "raw", "-o", str(raw)],
            capture_output=True,
            timeout=seconds + 30,
            preexec_fn=pinned_to(cpus),
        )
    finally:
        load.wait(timeout=seconds + 30)
    if not raw.exists():
        return {"error": "py-spy recorded nothing (ptrace not permitted?)"}
    return summarize_profile(raw)


def folded_samples(raw: Path) -> tuple[int, dict[str, int], dict[str, int]]:
    """py-spy's folded stacks: the sample total, and the samples of each frame by own
    time (the innermost frame) and inclusive time (anywhere in the stack, once)."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    return total, own, inclusive


def summarize_profile(raw: Path) -> dict[str, Any]:
    total, own, inclusive = folded_samples(raw)

    def top(table: dict[str, int], count: int, keep: Any = None) -> list[tuple[str, float]]:
        rows = sorted(table.items(), key=lambda kv: -kv[1])
        rows = [(f, n / total * 100) for f, n in rows if keep is None or keep(f)]
        return [(f, round(p, 1)) for f, p in rows[:count]]

    ours = ("app/", "aiohttp/", "redis/", "msgspec", "asyncio/", "uvloop")
    return {
        "samples": total,
        "self": top(own, 12),
        "inclusive_app": top(inclusive, 14, keep=lambda f: "(app/" in f),
        "inclusive_libs": top(
            inclusive,
            12,
            keep=lambda f: any(p in f for p in ours) and "(app/" not in f and "gunicorn" not in f,
        ),
    }


# ---- redis-benchmark: ceiling B ----------------------------------------------------------


def ceiling_b(
    stack: LoadStack,
    customer_id: str,
    phone_id: str,
    requests: int,
    cpus: Iterable[int] | None = None,
) -> dict[str, Any]:
    source = load_source("place_order")
    sha = hashlib.sha1(source.encode()).hexdigest()
    stack.stack.redis.cli("SCRIPT", "LOAD", source)
    rand = "__rand_int__"
    # redis-benchmark puts a fresh number in place of each __rand_int__: a new order
    # and a new Idempotency-Key record per call, in the customer's partition (the
    # order id's first two characters are the customer's, which carry its partition).
    # The id says chunk 0 ("AAAA", app/partitions.py: chunk_of), and the partition's
    # chunk state is set so that chunk 0 never fills in this run: one fixed command
    # cannot follow the chunks (the app does, from the answers). The one HSET a chunk
    # change adds every CHUNK_ORDERS orders is left out of this figure.
    order_id = customer_id[:2] + "AAAA" + rand
    partition = partition_of(customer_id)
    state = keys.order_chunk_state(partition)
    seq = keys.order_clock_parts(stack.stack.redis.cli("GET", keys.orders_seq(partition)).strip())[
        0
    ]
    stack.stack.redis.cli("SET", keys.orders_seq(partition), keys.order_clock(seq, 0, -(10**12)))
    # Chunk 0's start (its directory score), for a partition no order has reached yet.
    stack.stack.redis.cli("HSETNX", state, "0", "1")
    place = record_place(customer_id, "bench", 86_400, int(time.time()))
    command_keys = place_order_keys(customer_id, order_id, COMPLETED, place, [phone_id])
    # The record's field (16 bytes) then the fingerprint (12): a new field per call.
    request = f"{rand:>16}".replace(" ", "k") + "f" * 12
    args = [order_id, customer_id, str(int(time.time() * 1000)), "0" * 32, "1", "1", request]
    args += [str(place.expire_at), phone_id, "1"]
    command = [
        "redis-benchmark",
        "-p",
        str(stack.redis_port),
        "-n",
        str(requests),
        "-c",
        "50",
        "-r",
        "1000000000",
        "--csv",
        "EVALSHA",
        sha,
        str(len(command_keys)),
        *command_keys,
        *args,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, preexec_fn=pinned_to(cpus)
    )
    rows = [line for line in done.stdout.splitlines() if line.startswith('"EVALSHA')]
    if not rows:
        raise RuntimeError(f"redis-benchmark printed no result:\n{done.stdout}\n{done.stderr}")
    fields = [f.strip('"') for f in rows[-1].split(",")]
    return {
        "rps": float(fields[1]),
        "p50_ms": float(fields[4]),
        "p99_ms": float(fields[6]),
        "appendfsync": stack.stack.redis.cli("CONFIG", "GET", "appendfsync").split()[-1],
        "requests": requests,
    }
