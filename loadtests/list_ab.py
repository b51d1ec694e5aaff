"""The list cost in one run: what ``GET /phones?page=1`` and ``GET /orders?page=1`` (a
customer who has every bulk order) cost with 1M stored rows against 1k, with the two
measured side by side rather than one after the other.

    python -m loadtests.list_ab                          # this tree: 1k against 1M
    python -m loadtests.list_ab --ref bcd7d5c --ref .    # and the same for a baseline

Per ref, two stacks are up at once, one holding ``--small`` rows (phones and orders), the
other ``--rows``: each is that ref's own checkout (``git worktree add --detach`` in a temp
folder, as loadtests/ab_refs.py does; ``.`` is this working tree as it is), its own
``loadtests.stack.launch`` (2 instances x 1 worker, nginx with the bench's raised limits)
and its own ``loadtests.bench_data.bulk_load``, which writes the rows straight into
Redis in that checkout's key layout. Every stack is pinned to the stack CPUs, wrk to the
load CPUs (loadtests/rig.py). Then ``rounds`` rounds: per path, one wrk run of
``seconds`` on every stack in turn, the order reversed every other round, so drift on the
shared box hits every side alike. Per stack and path: the medians of wrk's rate and
latency, and of the CPU time per answer served of the app workers and of redis-server
(their process trees, from /proc: steadier than the rates on a shared box). The list
cost ratios are 1k's rate ÷ 1M's and 1M's CPU per answer ÷ 1k's (1.0: a page costs the
same whatever the data size), each also per round (the rounds' spread is the run's
noise). Bounded: the bulk loads, then 2 x stacks x rounds wrk runs; 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from loadtests import rig
from loadtests.ab_refs import checkout
from loadtests.bench_drivers import BENCH_LIMITS, wrk
from loadtests.support.cli import measurement_parser, publish

PATHS = {"phones": "/phones?page=1", "orders": "/orders?page=1"}
SMALL, LARGE = 1_000, 1_000_000
SMALL_LABEL, LARGE_LABEL = "1k", "1M"
# The bulk customer's own orders, placed through the API before the bulk load (a third
# each completed, open and cancelled): as in make bench, where that customer had placed orders too, its
# page merges status indexes that are not empty.
OWN_ORDERS = 40

# Run inside a side's checkout: start its stack, provision it, place OWN_ORDERS for the
# second customer, bulk-load ``rows`` phones and completed orders (all that customer's,
# newer than its own), say where it is, then hold it until stdin closes. The bulk rows
# are not real orders (no debit): AOF is off for them, as it was in make bench.
_SIDE = textwrap.dedent(
    """
    import json, re, sys, time, urllib.error, urllib.request
    from loadtests.bench_data import bulk_load, provision
    from loadtests.stack import launch
    env, rows, own = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

    def post(url, token, path, body, key=None):
        headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}
        if key:
            headers["Idempotency-Key"] = key
        request = urllib.request.Request(
            url + path, data=json.dumps(body).encode(), method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, ""

    with launch(env=env, instances=2, workers=1) as stack:
        phone_ids, people = provision(stack, phones=20, customers=2)
        customer = people[1]
        statuses = {}
        for i in range(own):
            # A third completed at once, a third left open, a third cancelled.
            body = {"items": [{"phone_id": phone_ids[i % 20], "quantity": 1}],
                    "autocheck": i % 3 == 0}
            status, answer = post(stack.direct_url, customer["token"], "/orders", body,
                                  "lists-" + str(i))
            statuses[status] = statuses.get(status, 0) + 1
            found = re.search('"id":"([^"]+)"', answer)
            if found and i % 3 == 2:
                status, _ = post(stack.direct_url, customer["token"],
                                 "/orders/" + found.group(1) + "/cancel", {})
                statuses[status] = statuses.get(status, 0) + 1
        stack.stack.redis.cli("CONFIG", "SET", "appendonly", "no")
        began = time.monotonic()
        bulk_load(stack, phones=rows, orders=rows, customer_id=customer["id"],
                  phone_id=phone_ids[0], start=0)
        print(json.dumps({"http_url": stack.http_url, "token": customer["token"],
                          "load_s": time.monotonic() - began, "own_orders": statuses}),
              flush=True)
        sys.stdin.read()
    """
)


def pin(root: int, split: rig.CpuSplit) -> None:
    """The side's stack on the stack CPUs with the bench stack's niceness
    (loadtests/rig.py: nginx's ahead of the rest)."""
    rig.pin_tree(root, split.stack)
    rig.renice(root, rig.priority())
    for pid in rig.process_tree(root):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"nginx: master"):
                rig.renice(pid, rig.front_priority())


@contextlib.contextmanager
def sides(
    trees: dict[str, Path], sizes: dict[str, int], env: dict[str, str], split: rig.CpuSplit
) -> Iterator[dict[tuple[str, str], dict[str, Any]]]:
    """A stack per (ref label, size label), all started and bulk-loaded at once, then
    pinned to the stack CPUs; yields each one's URL, the bulk customer's token, its
    root pid and how long its load took."""
    procs: dict[tuple[str, str], subprocess.Popen] = {}
    try:
        for label, tree in trees.items():
            for size_label, rows in sizes.items():
                procs[(label, size_label)] = subprocess.Popen(
                    [sys.executable, "-c", _SIDE, json.dumps(env), str(rows), str(OWN_ORDERS)],
                    cwd=tree,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
        up: dict[tuple[str, str], dict[str, Any]] = {}
        for key, proc in procs.items():
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the {key[1]} stack of {key[0]} did not start")
            up[key] = {**json.loads(line), "pid": proc.pid}
            if split.pinned:
                pin(proc.pid, split)
        yield up
    finally:
        for proc in procs.values():
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def measure(side: dict[str, Any], path: str, seconds: int, cpus: Any) -> dict[str, float]:
    """One wrk run of ``path`` on the side's nginx: rate, latency, and the app workers'
    and redis-server's CPU µs per answer served (2xx)."""
    headers = {"Authorization": f"Bearer {side['token']}"} if path.startswith("/orders") else None
    pid = side["pid"]
    app_before = rig.cpu_seconds([pid], only=b"gunicorn")
    redis_before = rig.cpu_seconds([pid], only=b"redis-server")
    result = wrk(f"{side['http_url']}{path}", seconds=seconds, headers=headers, cpus=cpus)
    app = rig.cpu_seconds([pid], only=b"gunicorn") - app_before
    redis = rig.cpu_seconds([pid], only=b"redis-server") - redis_before
    served = max(1, sum(n for status, n in result["statuses"].items() if 200 <= status < 300))
    return {
        "ok_rps": result["ok_rps"],
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
        "app_cpu_us": app * 1e6 / served,
        "redis_cpu_us": redis * 1e6 / served,
        "cpu_us": (app + redis) * 1e6 / served,
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def summarize(
    runs: dict[str, dict[str, list[dict[str, float]]]], small: str, large: str
) -> dict[str, Any]:
    """One ref's rounds (size label -> path -> a row per round) -> per path: each size's
    medians, and the list cost ratios: of the medians, and per round (paired by round)."""
    out: dict[str, Any] = {}
    for path in runs[small]:
        by_size = {
            size: {
                key: statistics.median(r[key] for r in runs[size][path])
                for key in runs[size][path][0]
            }
            for size in (small, large)
        }
        pairs = list(zip(runs[small][path], runs[large][path], strict=True))
        out[path] = {
            **by_size,
            "rps_ratio": _ratio(by_size[small]["ok_rps"], by_size[large]["ok_rps"]),
            "cpu_ratio": _ratio(by_size[large]["cpu_us"], by_size[small]["cpu_us"]),
            "rps_ratio_rounds": [_ratio(s["ok_rps"], g["ok_rps"]) for s, g in pairs],
            "cpu_ratio_rounds": [_ratio(g["cpu_us"], s["cpu_us"]) for s, g in pairs],
        }
    return out


def order_of_round(keys: Sequence[Any], round_: int) -> list[Any]:
    """Every side once; reversed every other round, so no side is always first or last."""
    return list(keys) if round_ % 2 == 0 else list(reversed(keys))


def compare(
    refs: Sequence[str],
    *,
    rows: int = LARGE,
    small: int = SMALL,
    rounds: int = 4,
    seconds: int = 3,
    env: dict[str, str] | None = None,
    split: rig.CpuSplit | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Every ref's two stacks up at once, ``rounds`` alternating rounds (see the module's
    docstring); per ref the summary of :func:`summarize`."""
    split = split or rig.cpu_split()
    cpus = split.load or None
    sizes = {SMALL_LABEL: small, LARGE_LABEL: rows}
    runs: dict[str, dict[str, dict[str, list[dict[str, float]]]]] = {
        ref: {size: {path: [] for path in PATHS} for size in sizes} for ref in refs
    }
    load_at_start = list(os.getloadavg())
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="phoneshop-lists-") as temp,
        contextlib.ExitStack() as trees_up,
    ):
        trees = {
            ref: trees_up.enter_context(checkout(ref, Path(temp) / f"tree-{n}"))
            for n, ref in enumerate(refs)
        }
        side_env = {**BENCH_LIMITS, **(env or {})}
        with sides(trees, sizes, side_env, split) as up:
            loaded = time.monotonic() - began
            if log:
                log(f"lists: {len(up)} stacks up and loaded in {loaded:.0f} s")
            order = list(up)
            for side in up.values():  # warm-up, not counted: the app, the page cache, scripts
                for path in PATHS.values():
                    measure(side, path, 1, cpus)
            for round_ in range(rounds):
                for name, path in PATHS.items():
                    for key in order_of_round(order, round_):
                        ref, size = key
                        runs[ref][size][name].append(measure(up[key], path, seconds, cpus))
            load_s = {f"{ref} {size}": side["load_s"] for (ref, size), side in up.items()}
            own = {f"{ref} {size}": side["own_orders"] for (ref, size), side in up.items()}
    return {
        "refs": list(refs),
        "rows": sizes,
        "small": SMALL_LABEL,
        "large": LARGE_LABEL,
        "rounds": rounds,
        "seconds": seconds,
        "split": split.describe(),
        "load_average": {"start": load_at_start, "end": list(os.getloadavg())},
        "bulk_load_s": load_s,
        # The API's answers (status -> count) to the bulk customer's own orders and cancels.
        "own_orders": own,
        "stacks_up_s": loaded,
        "duration_s": time.monotonic() - began,
        "by_ref": {ref: summarize(runs[ref], SMALL_LABEL, LARGE_LABEL) for ref in refs},
        "raw": runs,
    }


def bench_lists(report: dict[str, Any], ref: str = ".") -> dict[str, dict[str, Any]]:
    """make bench's ``lists`` figures (path -> size label -> row) for ``ref``."""
    summary = report["by_ref"][ref]
    return {
        path: {size: summary[path][size] for size in (report["small"], report["large"])}
        for path in summary
    }


def main(argv: list[str] | None = None) -> int:
    parser = measurement_parser("list_ab", __doc__)
    parser.add_argument(
        "--ref", action="append", default=[], help="git ref of a side ('.' = this tree); repeat"
    )
    parser.add_argument("--rows", type=int, default=LARGE, help="rows of the large stacks")
    parser.add_argument("--small", type=int, default=SMALL, help="rows of the small stacks")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=3)
    args = parser.parse_args(argv)
    report = compare(
        args.ref or ["."],
        rows=args.rows,
        small=args.small,
        rounds=args.rounds,
        seconds=args.seconds,
        log=lambda message: print(message, file=sys.stderr, flush=True),
    )
    return publish(report, args.json)


if __name__ == "__main__":
    sys.exit(main())
