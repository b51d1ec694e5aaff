"""loadtests/saga_cost.py on a small run: each phase makes the script calls it claims per
order, and every figure comes from the server (none reads as free). The 1-against-3-primaries
run is loadtests/bench_tier.py's (tests/test_bench_tier.py)."""

from __future__ import annotations

from pathlib import Path

from loadtests.saga_cost import run


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
