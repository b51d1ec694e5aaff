"""A/B of two versions of the code in one run: ``POST /orders`` and ``GET /bench/hello``
through nginx, wrk rounds alternating between the two stacks.

    python -m loadtests.ab_refs --a 194c2af --b HEAD [--rounds 4] [--seconds 5]
        [--a-env OVERLOAD_ADAPTIVE=0] [--b-env ...]

Two settings of one tree are the same command with both refs ``.``:

    python -m loadtests.ab_refs --a . --b . --a-env SAGA_ALWAYS_SPLIT=0 --b-env SAGA_ALWAYS_SPLIT=1

For a change that no setting switches off (the middleware chain), the A/B of
loadtests/bench.py (two stacks differing in one setting) cannot show it; this
one runs each side from its own checkout (``git worktree add --detach`` in a
temp folder, removed after; ``--a .``/``--b .`` is this working tree as it is).
Each side is that checkout's own ``loadtests.stack.launch`` (redis with AOF
always, 2 instances x 1 worker, nginx with the bench's raised limits) in a
process of its own, started with the checkout first on ``sys.path``; both are
pinned to the stack CPUs and wrk to the load CPUs (loadtests/rig.py). Rounds
alternate A first, then B first, so drift on the shared box hits both alike;
the report is the median per side and B/A, of the rates, of the app
workers' CPU time per answer served and of redis-server's per order served (CPU
is steadier than the rates on a shared box), with the load average at start and
end. Bounded: 2 x rounds x 2 wrk runs of ``seconds`` each, 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.ops.instances import ROOT
from loadtests import rig
from loadtests.bench_drivers import BENCH_LIMITS, wrk

# What each round measures: POST /orders and GET /bench/hello (its P1 figure); on asking
# (--paths), GET /phones?page=1 too, and cancels: each open order placed is cancelled by
# its customer (loadtests/wrk/cancels.lua), the figures per cancel with its order.
PATHS = ("orders", "hello")
ALL_PATHS = (*PATHS, "phones", "cancels")

# Run inside a side's checkout: start its stack, provision it, say where it is,
# then hold it until stdin closes.
_SIDE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from loadtests.bench_data import provision
    from loadtests.bench_drivers import write_wrk_data
    from loadtests.stack import launch
    env = json.loads(sys.argv[1])
    data = Path(sys.argv[2])
    with launch(env=env, instances=2, workers=1) as stack:
        phone_ids, people = provision(stack, phones=20, customers=200)
        write_wrk_data(data, phone_ids, people)
        print(json.dumps({"http_url": stack.http_url}), flush=True)
        sys.stdin.read()
    """
)


@contextlib.contextmanager
def checkout(ref: str, folder: Path) -> Iterator[Path]:
    if ref == ".":
        yield ROOT
        return
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), ref],
        check=True,
        capture_output=True,
    )
    try:
        yield folder
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)],
            capture_output=True,
        )


@contextlib.contextmanager
def side(
    tree: Path, env: dict[str, str], data: Path, split: rig.CpuSplit
) -> Iterator[tuple[str, int]]:
    """The side's stack, pinned to the stack CPUs; yields its nginx URL and root pid."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SIDE, json.dumps(env), str(data)],
        cwd=tree,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the stack in {tree} did not start")
        if split.pinned:
            rig.pin_tree(proc.pid, split.stack)
        yield json.loads(line)["http_url"], proc.pid
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def measure(
    url: str, pid: int, data: Path, seconds: int, cpus: Any, paths: tuple[str, ...] = PATHS
) -> dict[str, float]:
    row: dict[str, float] = {}
    for name, path, script, script_args in (
        ("orders", "/orders", "orders.lua", [str(data), secrets.token_hex(6), "0"]),
        ("hello", "/bench/hello", "hello.lua", None),
        ("phones", "/phones?page=1", "hello.lua", None),
        ("cancels", "/orders", "cancels.lua", [str(data), secrets.token_hex(6)]),
    ):
        if name not in paths:
            continue
        before = rig.cpu_seconds([pid], only=b"gunicorn")
        redis_before = rig.cpu_seconds([pid], only=b"redis-server")
        result = wrk(
            f"{url}{path}", script=script, script_args=script_args, seconds=seconds, cpus=cpus
        )
        used = rig.cpu_seconds([pid], only=b"gunicorn") - before
        redis_used = rig.cpu_seconds([pid], only=b"redis-server") - redis_before
        row[name] = result["ok_rps"] if name == "orders" else result["rps"]
        # Per answer served (2xx): refusals by nginx cost the app nothing, and
        # what the app spends refusing is part of what each served answer costs.
        served = sum(n for status, n in result["statuses"].items() if 200 <= status < 300)
        if name == "cancels":
            # Per cancel (200) with the order it cancelled (201): less the orders' figure
            # of the same round, the cancel's own cost.
            served = result["statuses"].get(200, 0)
            row[name] = result["rps"] * served / max(result["requests"], 1)
        row[f"{name}_app_cpu_us"] = used * 1e6 / max(served, 1)
        # The store's side of the same answers: a protocol of several scripts per order
        # (the split saga) shows here more than in the app.
        row[f"{name}_redis_cpu_us"] = redis_used * 1e6 / max(served, 1)
    return row


def parse_env(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


def compare(
    a: str,
    b: str,
    a_env: dict[str, str],
    b_env: dict[str, str],
    *,
    rounds: int,
    seconds: int,
    paths: tuple[str, ...] = PATHS,
) -> dict[str, Any]:
    """Both sides up at once, ``rounds`` alternating wrk rounds of each of ``paths``; the
    medians per side and B/A (see the module's docstring)."""
    split = rig.cpu_split()
    cpus = split.load or None
    rows: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
    load_at_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="phoneshop-ab-") as temp:
        folder = Path(temp)
        with (
            checkout(a, folder / "a") as tree_a,
            checkout(b, folder / "b") as tree_b,
            side(tree_a, {**BENCH_LIMITS, **a_env}, folder / "a.lua", split) as side_a,
            side(tree_b, {**BENCH_LIMITS, **b_env}, folder / "b.lua", split) as side_b,
        ):
            sides = {"a": (*side_a, folder / "a.lua"), "b": (*side_b, folder / "b.lua")}
            for url, pid, data in sides.values():  # warm-up, not counted
                measure(url, pid, data, 2, cpus, paths)
            for round_ in range(rounds):
                for label in ("a", "b") if round_ % 2 == 0 else ("b", "a"):
                    url, pid, data = sides[label]
                    rows[label].append(measure(url, pid, data, seconds, cpus, paths))
    report: dict[str, Any] = {"a": a, "b": b, "split": split.describe(), "rounds": rows}
    report["load_average"] = {"start": load_at_start, "end": list(os.getloadavg())}
    for key in rows["a"][0]:
        a_med = statistics.median(r[key] for r in rows["a"])
        b_med = statistics.median(r[key] for r in rows["b"])
        report[key] = {"a": a_med, "b": b_med, "b_over_a": b_med / a_med if a_med else 0.0}
    if "hello" in paths and "orders" in paths:
        for label in ("a", "b"):
            hello = report["hello"][label]
            report[f"p1_{label}"] = report["orders"][label] / hello if hello else 0.0
    return report


# ---- make bench's section: one redis-server against the baseline (issue 11, item 3) -------

ONE_NODE_TITLE = "One redis-server against the baseline (issue 11, item 3)"
# Orders/s through nginx on one redis-server must stay within 10% of the baseline's.
ONE_NODE_TARGET = 0.9
# main before the data tier's one code path: the figure item 3 keeps.
BASELINE_REF = "bcd7d5c"


def one_node_markdown(report: dict[str, Any], target: float = ONE_NODE_TARGET) -> str:
    orders, app, redis = (
        report["orders"],
        report["orders_app_cpu_us"],
        report["orders_redis_cpu_us"],
    )
    ratio = orders["b_over_a"]
    verdict = "met" if ratio >= target else "**missed**"
    start, end = report["load_average"]["start"][0], report["load_average"]["end"][0]
    rounds = report["rounds"]
    spread = {
        label: f"{min(r['orders'] for r in rounds[label]):,.0f} to {max(r['orders'] for r in rounds[label]):,.0f}"
        for label in ("a", "b")
    }
    b_side = "this tree" if report["b"] == "." else f"`{report['b']}`"
    return f"""| POST /orders through nginx, one redis-server | A: baseline `{report["a"]}` | B: {b_side} | B / A | target |
|---|---|---|---|---|
| orders/s (2xx), median of {len(rounds["a"])} rounds | {orders["a"]:,.0f} | {orders["b"]:,.0f} | {ratio:.2f} | ≥ {target} {verdict} |
| orders/s, every round | {spread["a"]} | {spread["b"]} | | |
| app workers' CPU µs per order | {app["a"]:.1f} | {app["b"]:.1f} | {app["b_over_a"]:.2f} | |
| redis-server CPU µs per order | {redis["a"]:.1f} | {redis["b"]:.1f} | {redis["b_over_a"]:.2f} | |

`python -m loadtests.ab_refs --a {report["a"]} --b {report["b"]} --paths orders`: each side from its own
checkout with its own defaults (the baseline places an order on one redis-server by its
default, `place_order`; this tree by its one order path),
2 instances x 1 worker, redis AOF `always`; {report["split"]}; rounds alternate A first, then B
first. Load average {start:.1f} at the start, {end:.1f} at the end.
"""


def section(args: argparse.Namespace, out: Path) -> dict[str, str]:
    """loadtests/bench.py's hook: this tree against the baseline ref, in this run."""
    ref = getattr(args, "baseline_ref", BASELINE_REF)
    try:
        report = compare(
            ref,
            ".",
            {},
            {},
            rounds=getattr(args, "ab_rounds", 4),
            seconds=getattr(args, "ab_seconds", 4),
            paths=("orders",),
        )
    except subprocess.CalledProcessError as error:  # a clone without that commit
        return {
            "title": ONE_NODE_TITLE,
            "markdown": f"Not measured: no checkout of `{ref}` here ({error.stderr!r}).\n",
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "one-node-ab.json").write_text(json.dumps(report, indent=1))
    return {"title": ONE_NODE_TITLE, "markdown": one_node_markdown(report)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.ab_refs", description=__doc__)
    parser.add_argument("--a", required=True, help="git ref of side A ('.' = this tree)")
    parser.add_argument("--b", default=".", help="git ref of side B ('.' = this tree)")
    parser.add_argument("--a-env", action="append", default=[], help="KEY=VALUE for side A")
    parser.add_argument("--b-env", action="append", default=[], help="KEY=VALUE for side B")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument(
        "--paths", default=",".join(PATHS), help=f"what to measure, of {', '.join(ALL_PATHS)}"
    )
    args = parser.parse_args(argv)
    report = compare(
        args.a,
        args.b,
        parse_env(args.a_env),
        parse_env(args.b_env),
        rounds=args.rounds,
        seconds=args.seconds,
        paths=tuple(args.paths.split(",")),
    )
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
