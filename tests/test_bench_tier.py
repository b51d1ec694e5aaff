"""make bench's data-tier section (loadtests/bench_tier.py) and its one-redis-server A/B
(loadtests/ab_refs.py): the recorded order calls replay to the same data on a real cluster,
a replay that differs is caught, the split into pipes keeps each partition's order, and
the figures and verdicts follow from the rows; a section that fails is reported in
BENCH.md instead of losing the run. No timing is asserted."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import keys
from app.ops.redis_cluster import LocalCluster
from app.partitions import slot
from app.scripts import SCRIPT_NAMES
from loadtests import rig
from loadtests.ab_refs import one_node_markdown
from loadtests.bench import measured_section
from loadtests.bench_tier import (
    Call,
    Recording,
    by_node,
    flush,
    markdown,
    record,
    replay,
    shard_figures,
    streams,
    verdicts,
)

UNPINNED = rig.CpuSplit(frozenset(), frozenset())


def call_on(partition: int, n: int) -> Call:
    return Call("reserve_stock", "0" * 40, (keys.reservations(partition),), (str(n),))


def test_pipes_keep_each_partitions_calls_in_their_order() -> None:
    calls = [call_on(partition, n) for n in range(40) for partition in (n % 7, (n * 3) % 11)]
    split = streams(calls, 4)
    assert len(split) <= 4
    assert sorted(map(id, (c for stream in split for c in stream))) == sorted(map(id, calls))
    for partition in range(11):
        mine = [c for c in calls if c.keys[0] == keys.reservations(partition)]
        holding = [stream for stream in split if mine[0] in stream] if mine else []
        if mine:
            assert len(holding) == 1  # one partition, one connection
            assert [c for c in holding[0] if c in mine] == mine


def test_calls_go_to_the_node_serving_their_first_keys_slot() -> None:
    calls = [call_on(p, p) for p in (0, 1, 64, 127)]
    nodes = by_node(calls, lambda s: 7001 if s < slot(64) else 7002)
    assert {port: [c.args[0] for c in cs] for port, cs in nodes.items()} == {
        7001: ["0", "1"],
        7002: ["64", "127"],
    }


@pytest.fixture(scope="module")
def one_primary_of_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster.on_free_ports(tmp_path_factory.mktemp("cluster"), 1, replicas=0)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def one_primary(one_primary_of_module: LocalCluster) -> LocalCluster:
    """The module's one-primary cluster (it takes seconds to form), flushed: each test
    records on an empty one, as on a fresh cluster."""
    flush(one_primary_of_module)
    return one_primary_of_module


def _recorded(cluster: LocalCluster) -> tuple[Recording, int]:
    return asyncio.run(record(cluster, orders=20, inflight=4, phones=8, customers=8))


def test_the_recorded_orders_replay_to_the_same_keys(
    one_primary: LocalCluster, tmp_path: Path
) -> None:
    recording, first = _recorded(one_primary)
    order_calls = recording.calls[first:]
    assert first > 0 and len(order_calls) >= 20  # the creations, then at least a call an order
    assert {call.script for call in recording.calls} <= set(SCRIPT_NAMES)
    # replay raises unless every primary holds exactly the keys the recording left.
    [row] = replay(one_primary, recording, first, 3, tmp_path / "replay", UNPINNED)
    assert row["calls"] == len(order_calls)
    assert sum(row["scripts"].values()) == len(order_calls)
    assert row["cpu_s"] > 0 and row["wall_s"] > 0


def test_a_replay_that_leaves_other_keys_fails(one_primary: LocalCluster, tmp_path: Path) -> None:
    recording, first = _recorded(one_primary)
    creations = recording.calls[:first]
    # Replaying without the last customer's creation leaves fewer keys than the recording.
    recording.calls = creations[:-1] + recording.calls[first:]
    with pytest.raises(RuntimeError, match="keys per node"):
        replay(one_primary, recording, first - 1, 3, tmp_path / "replay", UNPINNED)


def row(calls: int, cpu_s: float, wall_s: float, busy_s: float = 0.0) -> dict[str, Any]:
    scripts = {"commit_order": calls // 2, "reserve_stock": calls - calls // 2}
    return {"port": 1, "calls": calls, "scripts": scripts, "cpu_s": cpu_s, "wall_s": wall_s,
            "stack_busy_s": busy_s}  # fmt: skip


def test_the_ceilings_are_set_by_the_busiest_and_the_slowest_primary() -> None:
    one = shard_figures(1, 1000, [row(2500, 1.0, 2.0, 1.5)])
    even = shard_figures(3, 1000, [row(900, 0.4, 0.8), row(800, 0.35, 0.7), row(800, 0.35, 0.4)])
    assert one["measured_ceiling"] == 500 and one["derived_ceiling"] == 1000
    assert one["core_busy"] == [0.5] and one["core_never_idle"] == [0.75]
    assert even["calls_per_order"] == 2.5
    assert even["calls_per_order_by_script"] == {"commit_order": 1.25, "reserve_stock": 1.25}
    assert even["measured_ceiling"] == 1250 and even["derived_ceiling"] == 2500
    ratios = verdicts(one, even)
    assert ratios["cpu_per_order"] == pytest.approx(1.1) and ratios["cpu_per_order_met"]
    assert ratios["measured_ceiling"] == 2.5 and ratios["measured_ceiling_met"]
    assert ratios["derived_ceiling"] == 2.5 and ratios["derived_ceiling_met"]
    # The same CPU, but one primary doing most of it: the tier's ceiling is that primary's.
    uneven = shard_figures(3, 1000, [row(1500, 0.8, 1.6), row(500, 0.15, 0.3), row(500, 0.15, 0.3)])
    lopsided = verdicts(one, uneven)
    assert lopsided["cpu_per_order_met"] and not lopsided["derived_ceiling_met"]
    assert not lopsided["measured_ceiling_met"]
    one["orders_per_s_recorded"] = uneven["orders_per_s_recorded"] = 500.0
    batched = {"settle_window_s": 1.5, "p1": one, "p3": even, "ratios": ratios}
    text = markdown(
        {
            "p1": one,
            "p3": uneven,
            "ratios": lopsided,
            "batched": batched,
            "split": "x",
            "load_average": [1.0, 2.0],
        }
    )
    assert (
        "| Redis CPU µs per order, summed over the primaries (a) | 1000.0 | 1100.0 | 1.10 | ≤ 1.3 met |"
        in text
    )
    assert (
        "orders / busiest primary's CPU s (b) | 1,000 | 1,250 | 1.25 | ≥ 2.5 **missed** |" in text
    )
    assert "0.73 / 0.14 / 0.14" in text  # each primary's share of the CPU
    assert "| the same, by script | commit_order 1.25, reserve_stock 1.25 |" in text
    # The second table, settles as at the ceiling, is judged on its own rows.
    assert "the settler's window 1.50 s instead of 0.05 |" in text
    assert "orders / busiest primary's CPU s (b) | 1,000 | 2,500 | 2.50 | ≥ 2.5 met |" in text


def one_node_report(a: float, b: float) -> dict[str, Any]:
    rounds = {"a": [{"orders": a}], "b": [{"orders": b}]}
    figure = {"a": 100.0, "b": 110.0, "b_over_a": 1.1}
    return {
        "a": "bcd7d5c",
        "b": ".",
        "split": "x",
        "rounds": rounds,
        "load_average": {"start": [1.0], "end": [2.0]},
        "orders": {"a": a, "b": b, "b_over_a": b / a},
        "orders_app_cpu_us": figure,
        "orders_redis_cpu_us": figure,
    }


def test_the_one_node_ab_is_judged_against_ninety_percent_of_the_baseline() -> None:
    assert "| 1,000 | 910 | 0.91 | ≥ 0.9 met |" in one_node_markdown(one_node_report(1000, 910))
    assert "| 1,000 | 890 | 0.89 | ≥ 0.9 **missed** |" in one_node_markdown(
        one_node_report(1000, 890)
    )


def test_a_section_that_fails_is_reported_and_the_run_goes_on(tmp_path: Path) -> None:
    def broken(_args: argparse.Namespace, _out: Path) -> dict[str, str]:
        raise RuntimeError("the cluster did not form")

    def fine(_args: argparse.Namespace, out: Path) -> dict[str, str]:
        return {"title": "T", "markdown": str(out)}

    args = argparse.Namespace()
    failed = measured_section(broken, args, tmp_path)
    assert failed["title"] == __name__
    assert failed["markdown"] == "Not measured: `RuntimeError('the cluster did not form')`.\n"
    assert measured_section(fine, args, tmp_path) == {"title": "T", "markdown": str(tmp_path)}
