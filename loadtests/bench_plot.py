"""bench.png: the overload levels (left) and their timeline with the phases labelled (right)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PHASE_COLOURS = ("#e8f4e8", "#fff4d6", "#f8e0e0", "#f0d0f0", "#e0e8f8")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overload = results["overload"]
    levels = overload["levels"]
    windows = overload["timeline"]
    # One row of two plots; the figure is exactly as tall as that row.
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.2), layout="constrained")

    names = [f"{row['phase']}\n{row['planned_rps']:,.0f}/s" for row in levels]
    xs = range(len(levels))
    left.bar(
        [x - 0.2 for x in xs],
        [row["offered_rps"] for row in levels],
        width=0.4,
        color="#bbbbbb",
        label="offered/s (actually sent)",
    )
    left.bar(
        [x + 0.2 for x in xs],
        [row["goodput_rps"] for row in levels],
        width=0.4,
        color="#4c72b0",
        label="goodput (2xx)/s",
    )
    left.axhline(overload["capacity_rps"], color="black", ls=":", lw=1, label="capacity")
    for x, row in zip(xs, levels, strict=True):
        if not row["valid"]:
            left.text(x - 0.2, row["offered_rps"], "invalid", ha="center", va="bottom", color="red")
    left.set_xticks(list(xs), names, fontsize=8)
    left.set_ylabel("requests per second")
    latency = left.twinx()
    latency.plot(xs, [max(r["accepted_p99_ms"], 0.1) for r in levels], "ro-", label="p99 accepted")
    latency.plot(
        xs,
        [r["refused_p99_ms"] if r["refused"] else float("nan") for r in levels],
        "m^--",
        label="p99 refused (429/503)",
    )
    latency.set_yscale("log")
    latency.set_ylabel("latency from due time, ms")
    handles, labels = left.get_legend_handles_labels()
    more_h, more_l = latency.get_legend_handles_labels()
    left.legend(handles + more_h, labels + more_l, loc="upper left", fontsize=8)
    left.set_title("POST /orders, open loop, per level")

    ts = [w["t"] for w in windows]
    right.plot(ts, [w["due_rps"] for w in windows], color="#bbbbbb", ls=":", label="planned/s")
    right.plot(ts, [w["sent_rps"] for w in windows], color="#555555", label="sent/s")
    right.plot(ts, [w["accepted_rps"] for w in windows], color="#4c72b0", label="accepted/s")
    right.plot(ts, [w["refused_rps"] for w in windows], color="#dd8452", label="refused/s")
    right.set_xlabel("seconds into the open-loop run (by due time, 0.5 s windows)")
    right.set_ylabel("requests per second")
    right.set_yscale("symlog", linthresh=10)
    lat = right.twinx()
    lat.plot(ts, [max(w["p50_ms"], 0.1) for w in windows], "g--", lw=1, label="p50 accepted")
    lat.plot(ts, [max(w["p99_ms"], 0.1) for w in windows], "r--", lw=1, label="p99 accepted")
    lat.set_yscale("log")
    lat.set_ylabel("latency from due time, ms")
    top = right.get_ylim()[1]
    for index, row in enumerate(levels):
        start, end = overload["phase_spans"][index]
        right.axvspan(start, end, color=PHASE_COLOURS[index % len(PHASE_COLOURS)], zorder=0)
        right.text(
            (start + end) / 2,
            top,
            f"{row['phase']}{'' if row['valid'] else ' (invalid)'}",
            ha="center",
            va="top",
            fontsize=9,
            fontweight="bold",
        )
    handles, labels = right.get_legend_handles_labels()
    more_h, more_l = lat.get_legend_handles_labels()
    right.legend(handles + more_h, labels + more_l, loc="center left", fontsize=8)
    right.set_title("the same run over time: half -> 1x -> 3x -> 10x -> recovery")
    fig.savefig(path, dpi=100)
    plt.close(fig)
