"""BENCH.md from figures (loadtests/bench_report.py): an under-offered level is shown
INVALID and fails the validity target, and the targets are judged from the rows."""

from __future__ import annotations

from typing import Any

from loadtests.bench_report import list_cost_worse, overload_targets, render, storage_rows
from loadtests.list_ab import order_of_round, summarize


def level(phase: str, planned: float, offered: float, **figures: Any) -> dict[str, Any]:
    row = {
        "phase": phase,
        "planned_rps": planned,
        "offered_rps": offered,
        "offered_share": offered / planned,
        "valid": offered >= 0.95 * planned,
        "goodput_rps": min(offered, 100.0),
        "accepted_p50_ms": 5.0,
        "accepted_p99_ms": 10.0,
        "refused": 0,
        "refused_p99_ms": 0.0,
        "failures": 0,
        "statuses": {"201": 100},
        "waited_for_connection": 0,
        "generator_lag_p99_ms": 1.0,
    }
    return {**row, **figures}


def wrk_row(rps: float) -> dict[str, Any]:
    return {"ok_rps": rps, "p50_ms": 1.0, "p99_ms": 2.0, "statuses": {201: 10}}


def results(levels: list[dict[str, Any]]) -> dict[str, Any]:
    bench = {"rps": 500.0, "p50_ms": 1.0, "p99_ms": 2.0, "appendfsync": "always"}
    return {
        "hello": wrk_row(400.0),
        "phones": wrk_row(300.0),
        "orders": wrk_row(100.0),
        "orders_256": wrk_row(90.0),
        "ceiling_b": bench,
        "ceiling_b_everysec": bench,
        "lists": {
            name: {"1k": wrk_row(100.0), "1M": wrk_row(90.0)} for name in ("phones", "orders")
        },
        "memory": {
            "bytes_per_order": 250.0,
            "order_hash_bytes": 100.0,
            "index_share_bytes": {"orders": 150.0},
            "idempotency_hash_bytes": 80.0,
            "event_entry_bytes": 40.0,
        },
        "overload": {
            "capacity_rps": 100.0,
            "levels": levels,
            "timeline": [],
            "phase_spans": [],
            "recovery_s": 1.0,
            "processes": {"all_up": True, "detail": "all up"},
            "split": "stack on CPU 0, load generator on CPU 1",
            "pinning": {"checked": 11, "stray": []},
            "max_connections": 3000,
            "generator_cpu_share": 0.1,
            "connections_opened": 300,
        },
        "ab": [],
        "sections": [{"title": "Extra", "markdown": "extra body"}],
        "profile": {},
        "environment": {
            "when": "now",
            "duration_s": 1.0,
            "machine": "test",
            "instances": 2,
            "workers": 1,
            "limits": "none",
            "wrk": "1 thread",
            "loadavg_before": 0.0,
        },
    }


def healthy_levels() -> list[dict[str, Any]]:
    return [
        level("half", 50, 50),
        level("1x", 100, 100),
        level("3x", 300, 300, goodput_rps=95.0, accepted_p99_ms=25.0, refused=200),
        level("10x", 1000, 990, goodput_rps=92.0, accepted_p99_ms=28.0, refused=900),
        level("recovery", 50, 50),
    ]


def test_a_level_offered_short_is_invalid_in_the_report_and_the_targets() -> None:
    levels = healthy_levels()
    levels[3] = level("10x", 1000, 600, generator_lag_p99_ms=450.0)
    text = render(results(levels))
    row = next(line for line in text.splitlines() if line.startswith("| 10x |"))
    assert "**INVALID**" in row and "600 (60%)" in row
    assert "the generator itself wrote requests late" in text
    judged = {measure: verdict for measure, _, _, verdict in overload_targets(results(levels))}
    assert judged["the rig valid at every level (offered ≥ 95% of planned)"] == "**missed**"


def test_targets_are_judged_from_the_rows() -> None:
    judged = {m: (r, v) for m, r, _, v in overload_targets(results(healthy_levels()))}
    assert judged["accepted p99 at 3x ÷ half-load p99"] == ("2.50 (25.0 / 10.0 ms)", "met")
    assert judged["goodput at 3x ÷ capacity"][1] == "met"
    assert judged["goodput at 10x ÷ capacity"][1] == "met"
    assert judged["P1: orders/s ÷ hello/s, both through nginx (wrk)"] == (
        "0.25 (100 / 400)",
        "**missed**",
    )
    assert judged["the rig valid at every level (offered ≥ 95% of planned)"][1] == "met"
    assert judged["recovery to half-load latency after the overload"] == ("1.0 s", "met")


def test_a_level_row_shows_where_the_stack_cpu_went() -> None:
    levels = healthy_levels()
    levels[3]["cpu"] = {
        "stack_share": 0.93,
        "softirq_share": 0.12,
        "others_share": 0.05,
        "nginx_us": 15.2,
        "app_us": 20.4,
        "redis_us": 6.6,
    }
    rows = [line for line in render(results(levels)).splitlines() if line.startswith("| 10x |")]
    assert rows[0].endswith("| 93% / 12% / 5% | 15 / 20 / 7 |")
    half = next(line for line in render(results(levels)).splitlines() if line.startswith("| half"))
    assert half.endswith("| - | - |")


def test_extra_sections_are_rendered() -> None:
    text = render(results(healthy_levels()))
    assert "## Extra\n\nextra body" in text


def test_an_ab_row_reports_cpu_per_request_and_throughput() -> None:
    figures = results(healthy_levels())
    figures["ab"] = [
        {
            "name": "switch",
            "a_label": "off",
            "b_label": "on",
            "a_rounds": [100.0, 110.0],
            "b_rounds": [120.0, 130.0],
            "a_rps": 105.0,
            "b_rps": 125.0,
            "gain": 125.0 / 105.0,
            "a_cpu_us": 500.0,
            "b_cpu_us": 400.0,
            "cpu_gain": 1.25,
            "a_app_cpu_us": 300.0,
            "b_app_cpu_us": 200.0,
            "app_cpu_gain": 1.5,
            "a_nginx_cpu_us": 20.0,
            "b_nginx_cpu_us": 16.0,
            "nginx_cpu_gain": 1.25,
        }
    ]
    row = next(line for line in render(figures).splitlines() if line.startswith("| switch |"))
    assert "| 300 -> 200 | 1.50 | 20.0 -> 16.0 | 1.25 | 500 -> 400 | 1.25 |" in row
    assert "105 -> 125 (A: 100, 110; B: 120, 130) | 1.19 |" in row


def test_the_cost_breakdown_bounds_p1_from_the_measured_costs() -> None:
    """A hello costing 90 µs of stack CPU and an order 330 µs, 130 of them in nginx
    and redis: P1 from the costs is 90/330, at most 90/190 if the order's handler
    cost the app what hello's does, 90/130 with a free app; 0.6 leaves the app
    90/0.6 - 130 = 20 µs per order."""
    figures = results(healthy_levels())
    figures["hello"] = {
        **wrk_row(10_000.0),
        "cpu_us": {"nginx": 30.0, "app": 60.0, "redis": 0.0},
        "stack_cpu_share": 0.97,
    }
    figures["orders"] = {
        **wrk_row(2_700.0),
        "cpu_us": {"nginx": 40.0, "app": 200.0, "redis": 90.0},
        "stack_cpu_share": 0.95,
    }
    text = render(figures)
    assert "| hello: GET /bench/hello | 30 | 60 | 0 | 90 | 10,000/s | 97% |" in text
    assert "| order: POST /orders | 40 | 200 | 90 | 330 | 2,700/s | 95% |" in text
    assert "| measured (wrk rates) | 0.27 |" in text
    assert "| from the CPU costs above (hello's ÷ order's) | 0.27 |" in text
    assert "(the framework's own 60 µs) | 0.47 |" in text
    assert "| if the app cost nothing at all (nginx and redis only) | 0.69 |" in text
    assert "that leaves the app 20 µs per order" in text
    figures["orders"]["cpu_us"]["redis"] = 200.0
    assert "nothing is left for the app, whatever it does." in render(figures)


def test_the_goodput_bound_at_10x_comes_from_the_measured_cpu() -> None:
    """3x: 300 answered in 1 s, 95 served, app + redis 95 µs per request -> 300 µs
    per order. 10x: 10,000 answered per s, nginx 15 µs each = 15% of the CPU, the
    stack had 90%: 75% left pays for 2,500 orders/s = 2,500% of a capacity of 100."""
    levels = healthy_levels()
    cpu = {"stack_share": 0.9, "softirq_share": 0.05, "others_share": 0.0}
    levels[2] = {**levels[2], "planned": 300, "answered": 300}
    levels[2]["cpu"] = {**cpu, "nginx_us": 20.0, "app_us": 70.0, "redis_us": 25.0}
    levels[3] = {**levels[3], "planned": 10_000, "answered": 100_000}
    levels[3]["cpu"] = {**cpu, "nginx_us": 15.0, "app_us": 10.0, "redis_us": 3.0}
    text = render(results(levels))
    line = next(line for line in text.splitlines() if line.startswith("- **Goodput at 10x.**"))
    assert "nginx spent 15.0 µs of stack CPU per request at 10x (10,000/s answered), 15%" in line
    assert "At the 300 µs an order cost the app and redis at 3x" in line
    assert "at most 2,500 orders/s = 2500% of the capacity; measured 92/s" in line
    # (0.9 - 0.9 x 100 x 300e-6) / 10,000 per s = 87.3 µs.
    assert "cost nginx about 87.3 µs." in line


def test_what_goodput_at_3x_needs_comes_from_the_measured_cpu() -> None:
    """3x: 300 answered in 1 s, 60 served, 240 refused; nginx 20 µs per request = 6,000 µs,
    of which 60 orders x 40 µs (wrk's nginx per order) = 2,400 are the orders': 3,600 µs
    over 240 refusals = 15 µs each, 0.36% of the CPU. An order costs 330 µs under wrk, so
    the 90% - 0.36% left pays for 2,716 orders/s; 90 orders/s (90% of 100) need the
    refusals to cost at most (0.9 - 90 x 330e-6) / 210 = 4,144 µs each."""
    levels = healthy_levels()
    cpu = {"stack_share": 0.9, "softirq_share": 0.05, "others_share": 0.0}
    levels[2] = {**levels[2], "planned": 300, "answered": 300, "goodput_rps": 60.0}
    levels[2]["cpu"] = {**cpu, "nginx_us": 20.0, "app_us": 70.0, "redis_us": 25.0}
    figures = results(levels)
    figures["orders"]["cpu_us"] = {"nginx": 40.0, "app": 200.0, "redis": 90.0}
    text = render(figures)
    line = next(line for line in text.splitlines() if line.startswith("- **Goodput at 3x.**"))
    assert "240 refusals/s cost nginx about 15.0 µs each" in line
    assert "At the 330 µs of stack CPU an order costs under wrk" in line
    assert "pays for at most 2,716 orders/s = 2716% of the capacity; measured 60/s" in line
    assert "refusals at most 4144.3 µs each" in line
    figures["orders"]["cpu_us"] = {"nginx": 40.0, "app": 9_000.0, "redis": 1_000.0}
    assert "out of reach on this stack CPU" in render(figures)


def list_row(rps: float, cpu_us: float) -> dict[str, Any]:
    return {**wrk_row(rps), "cpu_us": cpu_us, "app_cpu_us": cpu_us - 20.0, "redis_cpu_us": 20.0}


def test_the_list_rows_judge_the_cost_ratios_by_throughput_and_by_cpu() -> None:
    """1k at 200 µs and 2,000/s, 1M at 360 µs and 1,600/s: 1.25 by throughput (met),
    1.80 by CPU per answer (missed); a results file without CPU shows no CPU row."""
    figures = results(healthy_levels())
    figures["lists"]["orders"] = {"1k": list_row(2_000.0, 200.0), "1M": list_row(1_600.0, 360.0)}
    rows = {measure: (value, verdict) for measure, value, _, _, verdict in storage_rows(figures)}
    assert rows["list cost ratio 1M ÷ 1k (orders), by throughput"] == ("1.25", "met")
    assert rows["list cost ratio 1M ÷ 1k (orders), by app + redis CPU per answer"] == (
        "1.80",
        "**missed**",
    )
    assert "list cost ratio 1M ÷ 1k (phones), by app + redis CPU per answer" not in rows
    assert "app + redis CPU 360 µs per answer (app 340, redis 20.0)" in render(figures)


def lists_report(a_rounds: list[float], b_rounds: list[float]) -> dict[str, Any]:
    """A list_ab report of two refs whose per-round ratios are given (CPU as throughput)."""

    def summary(rounds: list[float]) -> dict[str, Any]:
        ratio = sorted(rounds)[len(rounds) // 2]
        row = {
            "1k": list_row(1_000.0, 100.0),
            "1M": list_row(1_000.0 / ratio, 100.0 * ratio),
            "rps_ratio": ratio,
            "cpu_ratio": ratio,
            "rps_ratio_rounds": rounds,
            "cpu_ratio_rounds": rounds,
        }
        return {"phones": row, "orders": row}

    return {
        "refs": ["base", "."],
        "rows": {"1k": 1_000, "1M": 1_000_000},
        "small": "1k",
        "large": "1M",
        "rounds": len(a_rounds),
        "seconds": 3,
        "split": "stack on CPU 0, load generator on CPU 1",
        "load_average": {"start": [1.0], "end": [2.0]},
        "by_ref": {"base": summary(a_rounds), ".": summary(b_rounds)},
    }


def test_the_list_cost_against_the_baseline_is_worse_only_beyond_every_round() -> None:
    figures = results(healthy_levels())
    figures["lists_ab"] = lists_report([1.0, 1.1, 1.2], [1.15, 1.3, 1.4])
    text = render(figures)
    assert "`python -m loadtests.list_ab --ref base --ref . --rows 1000000 --rounds 3" in text
    row = next(line for line in text.splitlines() if line.startswith("| GET /orders?page=1, by t"))
    # The rounds overlap (1.15 < 1.2): not worse beyond the run's noise.
    assert (
        row
        == "| GET /orders?page=1, by throughput | 1.10 (1.00-1.20) | 1.30 (1.15-1.40) | 1.18 | no |"
    )
    figures["lists_ab"] = lists_report([1.0, 1.1, 1.2], [1.25, 1.3, 1.4])
    row = next(
        line
        for line in render(figures).splitlines()
        if line.startswith("| GET /phones?page=1, by app + redis CPU")
    )
    assert row.endswith("| **yes** |")
    assert list_cost_worse([1.0, 1.2], [1.2, 1.3]) is False
    assert list_cost_worse([], [1.3]) is False


def test_list_ab_ratios_are_of_the_medians_and_per_round() -> None:
    """Rounds 1k: 1,000, 1,100, 900/s at 100, 110, 90 µs; 1M: 800, 1,000, 900/s at 120,
    110, 100 µs. Medians 1,000 and 900/s -> 1.11; CPU 110 over 100 µs -> 1.10 (1M ÷ 1k).
    Paired by round: 1.25, 1.10, 1.00 and 1.20, 1.00, 1.11."""
    small = [(1_000.0, 100.0), (1_100.0, 110.0), (900.0, 90.0)]
    large = [(800.0, 120.0), (1_000.0, 110.0), (900.0, 100.0)]
    runs = {
        size: {"orders": [{"ok_rps": r, "cpu_us": c} for r, c in rows]}
        for size, rows in (("1k", small), ("1M", large))
    }
    out = summarize(runs, "1k", "1M")["orders"]
    assert out["1k"] == {"ok_rps": 1_000.0, "cpu_us": 100.0}
    assert out["1M"] == {"ok_rps": 900.0, "cpu_us": 110.0}
    assert round(out["rps_ratio"], 2) == 1.11 and round(out["cpu_ratio"], 2) == 1.10
    assert [round(r, 2) for r in out["rps_ratio_rounds"]] == [1.25, 1.1, 1.0]
    assert [round(r, 2) for r in out["cpu_ratio_rounds"]] == [1.2, 1.0, 1.11]
    assert order_of_round(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert order_of_round(["a", "b", "c"], 1) == ["c", "b", "a"]
