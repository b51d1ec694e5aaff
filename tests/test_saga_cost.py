"""loadtests/saga_cost.py and saga_shards.py on small runs: each phase makes the script
calls it claims per order, and every figure comes from the servers (none reads as free)."""

from __future__ import annotations

from pathlib import Path

from loadtests.saga_cost import run
from loadtests.saga_shards import run as run_shards


async def test_the_cost_run_counts_the_calls_of_each_phase(tmp_path: Path) -> None:
    results = await run(orders=200, inflight=4, directory=tmp_path)
    calls = {row["phase"]: row["script_calls_per_order"] for row in results}
    today, by_saga, reserve, settle, swept = calls.values()
    assert (today, reserve, settle, swept) == (1, 1, 1, 3)
    # Reserve and commit per order; the settles of one phone partition's orders answered
    # within the settler's delay share a call.
    assert 2 < by_saga <= 3
    for row in results:
        assert row["orders"] == 200
        assert row["redis_cpu_us_per_order"] > 0 and row["script_us_per_call"] > 0


async def test_the_shards_run_places_cross_partition_orders_on_1_and_3_primaries(
    tmp_path: Path,
) -> None:
    one, three, ratios = await run_shards(orders=60, inflight=4, directory=tmp_path)
    assert (one["primaries"], three["primaries"]) == (1, 3)
    for row in (one, three):
        # Reserve and commit per order, and at most one settle each (batched: fewer).
        assert 2 < row["script_calls_per_order"] <= 3
        assert row["redis_cpu_us_per_order"] > 0
    assert ratios["cpu_per_order_3_to_1"] > 0
