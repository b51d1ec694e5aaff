"""BENCH.md from the bench's results (loadtests/bench.py): targets, overload levels,
ceilings, list cost, memory, the A/B comparisons, the profile, and extra sections."""

from __future__ import annotations

from typing import Any

# Issue 12's targets, and the older ones of the list and memory work.
TARGETS = {
    "p1_orders_over_hello": 0.6,
    "overload_p99_over_half_p99": 3.0,
    "goodput_share_at_3x": 0.9,
    "refused_p99_ms": 20.0,
    "recovery_s": 2.0,
    "list_ratio_1m_over_1k": 1.5,
    "bytes_per_order": 300,
    "idempotency_record_bytes": 150,
}


def met(value: float | None, target: float, lower_is_better: bool) -> str:
    if value is None:
        return "n/a"
    ok = value <= target if lower_is_better else value >= target
    return "met" if ok else "**missed**"


def _ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def overload_targets(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measure, result, target, met) for issue 12's table, from one run."""
    over = results["overload"]
    by = {row["phase"]: row for row in over["levels"]}
    half, three, ten = by["half"], by["3x"], by["10x"]
    capacity = over["capacity_rps"]
    p1 = results["orders"]["ok_rps"] / results["hello"]["ok_rps"] if results["hello"] else 0.0
    all_valid = all(row["valid"] for row in over["levels"])
    rows = []

    def bounds(level: dict[str, Any], label: str) -> None:
        ratio = level["accepted_p99_ms"] / half["accepted_p99_ms"] if half["accepted_p99_ms"] else 0
        share = level["goodput_rps"] / capacity if capacity else 0.0
        rows.append(
            (
                f"accepted p99 at {label} ÷ half-load p99",
                f"{ratio:.2f} ({_ms(level['accepted_p99_ms'])} / {_ms(half['accepted_p99_ms'])} ms)",
                "≤ 3",
                met(ratio, TARGETS["overload_p99_over_half_p99"], True),
            )
        )
        rows.append(
            (
                f"goodput at {label} ÷ capacity",
                f"{share:.0%} ({level['goodput_rps']:,.0f} / {capacity:,.0f} per s)",
                "≥ 90%",
                met(share, TARGETS["goodput_share_at_3x"], False),
            )
        )
        refused = level["refused_p99_ms"] if level["refused"] else None
        rows.append(
            (
                f"p99 of refused answers at {label}",
                "none refused" if refused is None else f"{_ms(refused)} ms ({level['refused']:,})",
                "≤ 20 ms",
                "n/a" if refused is None else met(refused, TARGETS["refused_p99_ms"], True),
            )
        )
        rows.append(
            (
                f"failures at {label} (answers other than 2xx/402/409/429/503, or none)",
                f"{level['failures']:,}",
                "0",
                "met" if level["failures"] == 0 else "**missed**",
            )
        )

    bounds(three, "3x")
    bounds(ten, "10x")
    up = over["processes"]
    rows.append(
        (
            "every process up after 10x",
            "yes" if up["all_up"] else f"**no**: {up['detail']}",
            "yes",
            "met" if up["all_up"] else "**missed**",
        )
    )
    recovery = over["recovery_s"]
    rows.append(
        (
            "recovery to half-load latency after the overload",
            "never within the phase" if recovery is None else f"{recovery:.1f} s",
            "≤ 2 s",
            met(recovery, TARGETS["recovery_s"], True) if recovery is not None else "**missed**",
        )
    )
    rows.append(
        (
            "P1: orders/s ÷ hello/s, both through nginx (wrk)",
            f"{p1:.2f} ({results['orders']['ok_rps']:,.0f} / {results['hello']['ok_rps']:,.0f})",
            "≥ 0.6",
            met(p1, TARGETS["p1_orders_over_hello"], False),
        )
    )
    rows.append(
        (
            "the rig valid at every level (offered ≥ 95% of planned)",
            "yes" if all_valid else "**no**: see the invalid levels below",
            "yes",
            "met" if all_valid else "**missed**",
        )
    )
    return rows


def levels_table(over: dict[str, Any]) -> str:
    lines = [
        "| level | planned/s | offered/s (share) | valid | goodput/s | accepted p50 / p99 ms "
        "| refused | refused p99 ms | failures | statuses | sent late for want of a connection "
        "| generator lag p99 ms | stack CPU: the stack's / softirq / other processes' share "
        "| per request: nginx / app / redis µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in over["levels"]:
        mix = ", ".join(f"{k}: {v:,}" for k, v in row["statuses"].items())
        cpu = row.get("cpu")
        cpu_cells = (
            f"{cpu['stack_share']:.0%} / {cpu.get('softirq_share', 0):.0%} / "
            f"{cpu['others_share']:.0%} "
            f"| {cpu['nginx_us']:,.0f} / {cpu['app_us']:,.0f} / {cpu['redis_us']:,.0f}"
            if cpu
            else "- | -"
        )
        lines.append(
            f"| {row['phase']} | {row['planned_rps']:,.0f} | {row['offered_rps']:,.0f} "
            f"({row['offered_share']:.0%}) | {'yes' if row['valid'] else '**INVALID**'} "
            f"| {row['goodput_rps']:,.0f} | {_ms(row['accepted_p50_ms'])} / "
            f"{_ms(row['accepted_p99_ms'])} | {row['refused']:,} | "
            f"{_ms(row['refused_p99_ms']) if row['refused'] else '-'} | {row['failures']:,} "
            f"| {mix} | {row['waited_for_connection']:,} | {row['generator_lag_p99_ms']:.1f} "
            f"| {cpu_cells} |"
        )
    return "\n".join(lines)


def ceilings_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    a, phones, orders = results["hello"], results["phones"], results["orders"]
    wide = results["orders_256"]
    b, b2 = results["ceiling_b"], results["ceiling_b_everysec"]
    rows = [
        (
            "hello: GET /bench/hello via nginx (wrk, closed loop)",
            f"{a['ok_rps']:,.0f} req/s",
            f"p50 {a['p50_ms']:.1f} / p99 {a['p99_ms']:.1f} ms",
        ),
        (
            "GET /phones?page=1 via nginx (wrk)",
            f"{phones['ok_rps']:,.0f} req/s",
            f"p50 {phones['p50_ms']:.1f} / p99 {phones['p99_ms']:.1f} ms",
        ),
        (
            "POST /orders via nginx (wrk, 64 connections)",
            f"{orders['ok_rps']:,.0f} orders/s",
            f"p50 {orders['p50_ms']:.1f} / p99 {orders['p99_ms']:.1f} ms; "
            f"statuses {orders['statuses']}",
        ),
        (
            "POST /orders via nginx (wrk, 256 connections)",
            f"{wide['ok_rps']:,.0f} orders/s",
            f"p50 {wide['p50_ms']:.1f} / p99 {wide['p99_ms']:.1f} ms; "
            f"statuses {wide['statuses']}; the capacity is the better of the two",
        ),
        (
            f"ceiling B: redis-benchmark EVALSHA place_order (appendfsync {b['appendfsync']})",
            f"{b['rps']:,.0f} scripts/s",
            f"p50 {b['p50_ms']:.2f} / p99 {b['p99_ms']:.2f} ms; orders/s ÷ B = "
            f"{orders['ok_rps'] / b['rps'] if b['rps'] else 0:.2f}",
        ),
        (
            "ceiling B with appendfsync everysec (comparison only)",
            f"{b2['rps']:,.0f} scripts/s",
            f"p50 {b2['p50_ms']:.2f} / p99 {b2['p99_ms']:.2f} ms",
        ),
    ]
    return rows


def _list_cost_ratios(small: dict[str, Any], large: dict[str, Any]) -> tuple[float, float | None]:
    """1k's rate ÷ 1M's, and 1M's app + redis CPU per answer ÷ 1k's (None when the run
    did not measure CPU: a results file of an older make bench)."""
    rps = small["ok_rps"] / large["ok_rps"] if large["ok_rps"] else 0.0
    if "cpu_us" not in small or "cpu_us" not in large:
        return rps, None
    return rps, large["cpu_us"] / small["cpu_us"] if small["cpu_us"] else 0.0


def storage_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    lists, mem = results["lists"], results["memory"]
    rows = []
    for name in ("phones", "orders"):
        small, large = lists[name]["1k"], lists[name]["1M"]
        ratio, cpu_ratio = _list_cost_ratios(small, large)
        path = "/phones?page=1" if name == "phones" else "/orders?page=1 (customer with them all)"
        for label, row in (("1k", small), ("1M", large)):
            cpu = (
                f"; app + redis CPU {row['cpu_us']:,.0f} µs per answer "
                f"(app {row['app_cpu_us']:,.0f}, redis {row['redis_cpu_us']:,.1f})"
                if "cpu_us" in row
                else ""
            )
            rows.append(
                (
                    f"GET {path}: {label} rows",
                    f"{row['ok_rps']:,.0f} req/s",
                    f"p50 {row['p50_ms']:.1f} / p99 {row['p99_ms']:.1f} ms{cpu}",
                    "",
                    "",
                )
            )
        rows.append(
            (
                f"list cost ratio 1M ÷ 1k ({name}), by throughput",
                f"{ratio:.2f}",
                "",
                "≤ 1.5",
                met(ratio, TARGETS["list_ratio_1m_over_1k"], True),
            )
        )
        if cpu_ratio is not None:
            rows.append(
                (
                    f"list cost ratio 1M ÷ 1k ({name}), by app + redis CPU per answer",
                    f"{cpu_ratio:.2f}",
                    "",
                    "≤ 1.5",
                    met(cpu_ratio, TARGETS["list_ratio_1m_over_1k"], True),
                )
            )
    for tier, sizes in mem.get("tiers", {"one redis-server": [mem]}).items():
        for size in sizes:
            index_detail = ", ".join(f"{k} {v:.0f}" for k, v in size["index_share_bytes"].items())
            at = f" at {size['orders']:,} orders" if "orders" in size else ""
            rows.append(
                (
                    f"Redis memory per stored order, {tier}{at}",
                    f"{size['bytes_per_order']:.0f} bytes",
                    f"hash {size['order_hash_bytes']:.0f} + index shares: {index_detail}"
                    + (
                        f"; used_memory growth {size['used_memory_per_order']:.0f}"
                        if "used_memory_per_order" in size
                        else ""
                    ),
                    "≤ 300",
                    met(size["bytes_per_order"], TARGETS["bytes_per_order"], True),
                )
            )
            record = size.get("idempotency_record_bytes", size.get("idempotency_hash_bytes", 0))
            rows.append(
                (
                    f"Idempotency-Key record, {tier}{at}",
                    f"{record:.0f} bytes",
                    f"kept 24-48 h (buckets a TTL wide); plus {size['event_entry_bytes']:.0f} bytes of stream entries "
                    "per order until trimmed",
                    "≤ 150",
                    met(record, TARGETS["idempotency_record_bytes"], True),
                )
            )
    return rows


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def list_cost_worse(a_rounds: list[float], b_rounds: list[float]) -> bool:
    """B's list cost ratio worse than A's beyond the run's noise: every round of B above
    every round of A (the rounds alternate between the stacks, so drift hits both)."""
    return bool(a_rounds and b_rounds) and min(b_rounds) > max(a_rounds)


def list_cost_text(results: dict[str, Any]) -> str:
    """How the list rows were measured (loadtests/list_ab.py), and, when the run measured
    the baseline too, its list cost ratios beside this tree's."""
    report = results.get("lists_ab")
    if not report:
        return ""
    refs, small, large = report["refs"], report["small"], report["large"]
    sizes = report["rows"]
    start, end = report["load_average"]["start"][0], report["load_average"]["end"][0]
    command = " ".join(
        [
            "python -m loadtests.list_ab",
            *(f"--ref {ref}" for ref in refs),
            f"--rows {sizes[large]}",
            f"--rounds {report['rounds']}",
            f"--seconds {report['seconds']}",
        ]
    )
    text = (
        f"The list rows: {len(refs) * 2} stacks up at once, per checkout one with "
        f"{sizes[small]:,} and one with {sizes[large]:,} phones and orders (all of one "
        "customer's, bulk-loaded by that checkout's own loader in its own key layout, after "
        "the customer placed a few orders through the API), each pinned to the stack CPUs; "
        f"{report['rounds']} rounds of wrk, {report['seconds']} s per path and stack, the "
        "stacks' order reversed every other round; medians of the rounds. CPU per answer: "
        "the app workers' and redis-server's process trees, from /proc. "
        f"{report['split'][:1].upper()}{report['split'][1:]}; load average {start:.1f} at "
        f"the start, {end:.1f} at the end. "
        f"`{command}`.\n"
    )
    if len(refs) < 2:
        return text
    a, b = refs[0], refs[-1]
    label = {ref: "this tree" if ref == "." else f"`{ref}`" for ref in (a, b)}
    lines = [
        f"| list cost {large} ÷ {small} (median of rounds; every round's range) "
        f"| A: baseline {label[a]} | B: {label[b]} | B ÷ A | B worse beyond the rounds? |",
        "|---|---|---|---|---|",
    ]
    for path, name in (("phones", "GET /phones?page=1"), ("orders", "GET /orders?page=1")):
        for key, measure in (("rps", "by throughput"), ("cpu", "by app + redis CPU per answer")):
            ra, rb = report["by_ref"][a][path], report["by_ref"][b][path]
            ratio_a, ratio_b = ra[f"{key}_ratio"], rb[f"{key}_ratio"]
            rounds_a, rounds_b = ra[f"{key}_ratio_rounds"], rb[f"{key}_ratio_rounds"]
            worse = list_cost_worse(rounds_a, rounds_b)
            lines.append(
                f"| {name}, {measure} | {ratio_a:.2f} ({_spread(rounds_a)}) "
                f"| {ratio_b:.2f} ({_spread(rounds_b)}) "
                f"| {ratio_b / ratio_a if ratio_a else 0.0:.2f} | {'**yes**' if worse else 'no'} |"
            )
    return (
        text + "\nIssue 17: the list cost ratios must not get worse than the baseline's, in the "
        "same run.\n\n" + "\n".join(lines) + "\n"
    )


def ab_table(comparisons: list[dict[str, Any]]) -> str:
    if not comparisons:
        return "No A/B comparison ran."
    lines = [
        "| comparison | A | B | app CPU per request, A -> B (µs, median of rounds) | A ÷ B "
        "| nginx CPU per request, A -> B (µs) | A ÷ B "
        "| whole stack's CPU per request, A -> B (µs) | A ÷ B "
        "| orders/s, A -> B (median; rounds) | B ÷ A |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        a_rounds = ", ".join(f"{r:,.0f}" for r in c["a_rounds"])
        b_rounds = ", ".join(f"{r:,.0f}" for r in c["b_rounds"])
        lines.append(
            f"| {c['name']} | {c['a_label']} | {c['b_label']} "
            f"| {c['a_app_cpu_us']:,.0f} -> {c['b_app_cpu_us']:,.0f} | {c['app_cpu_gain']:.2f} "
            f"| {c.get('a_nginx_cpu_us', 0):,.1f} -> {c.get('b_nginx_cpu_us', 0):,.1f} "
            f"| {c.get('nginx_cpu_gain', 0):.2f} "
            f"| {c['a_cpu_us']:,.0f} -> {c['b_cpu_us']:,.0f} | {c['cpu_gain']:.2f} "
            f"| {c['a_rps']:,.0f} -> {c['b_rps']:,.0f} (A: {a_rounds}; B: {b_rounds}) "
            f"| {c['gain']:.2f} |"
        )
    return "\n".join(lines)


def cost_section(results: dict[str, Any]) -> str:
    """Where a hello and an order spend the stack's CPU, and the best P1 those costs allow."""
    hello, orders = results["hello"], results["orders"]
    if "cpu_us" not in hello or "cpu_us" not in orders:
        return "Not measured in this run."
    parts = ("nginx", "app", "redis")
    lines = [
        "| per answer served | nginx µs | app µs | redis µs | whole stack µs | rate (wrk) "
        "| stack CPU busy |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, row in (("hello: GET /bench/hello", hello), ("order: POST /orders", orders)):
        cost = row["cpu_us"]
        lines.append(
            f"| {label} | "
            + " | ".join(f"{cost[p]:,.0f}" for p in parts)
            + f" | {sum(cost.values()):,.0f} | {row['ok_rps']:,.0f}/s "
            f"| {row['stack_cpu_share']:.0%} |"
        )
    h = sum(hello["cpu_us"].values())
    o = orders["cpu_us"]
    outside_app = o["nginx"] + o["redis"]
    p1 = orders["ok_rps"] / hello["ok_rps"] if hello["ok_rps"] else 0.0
    app_budget = h / TARGETS["p1_orders_over_hello"] - outside_app
    bounds = [
        ("measured (wrk rates)", p1),
        ("from the CPU costs above (hello's ÷ order's)", h / sum(o.values())),
        (
            "if the order's handler cost the app no more than hello's does "
            f"(the framework's own {hello['cpu_us']['app']:,.0f} µs)",
            h / (outside_app + hello["cpu_us"]["app"]),
        ),
        ("if the app cost nothing at all (nginx and redis only)", h / outside_app),
    ]
    lines += [
        "",
        "| P1 = orders/s ÷ hello/s | value |",
        "|---|---|",
        *(f"| {label} | {value:.2f} |" for label, value in bounds),
        "",
        f"With the stack CPU the limit, P1 = hello's cost ÷ an order's. P1 = "
        f"{TARGETS['p1_orders_over_hello']} needs an order to cost at most "
        f"{h / TARGETS['p1_orders_over_hello']:,.0f} µs of stack CPU, "
        f"{outside_app:,.0f} µs of which go to nginx and redis (redis runs the Lua script "
        "and fsyncs the AOF before answering): "
        + (
            f"that leaves the app {app_budget:,.0f} µs per order, against the "
            f"{hello['cpu_us']['app']:,.0f} µs aiohttp spends on a hello that does nothing "
            f"and the {o['app']:,.0f} µs an order costs it now."
            if app_budget > 0
            else "nothing is left for the app, whatever it does."
        ),
    ]
    return "\n".join(lines)


def profile_lines(prof: dict[str, Any]) -> list[str]:
    if "self" not in prof:
        return [f"no profile: {prof.get('error', 'not run')}"]
    lines = [f"py-spy, one worker during POST /orders, {prof['samples']} samples.", ""]
    for title, key in (
        ("inclusive, app code", "inclusive_app"),
        ("inclusive, libraries", "inclusive_libs"),
        ("self time", "self"),
    ):
        lines += [f"| {title} | % |", "|---|---|"]
        lines += [f"| `{frame}` | {share} |" for frame, share in prof[key]]
        lines.append("")
    return lines


def goodput_bound(over: dict[str, Any]) -> list[str]:
    """How many orders the stack CPU left after nginx's refusals at 10x could pay for,
    at what an order cost the app and redis at 3x."""
    rows = {row["phase"]: row for row in over["levels"]}
    top, three = rows.get("10x"), rows.get("3x")
    if not top or not three or "cpu" not in top or "cpu" not in three:
        return []
    seconds = top["planned"] / top["planned_rps"] if top["planned_rps"] else 0.0
    rate = top["answered"] / seconds if seconds else 0.0
    nginx_share = top["cpu"]["nginx_us"] * rate / 1e6
    left = max(0.0, top["cpu"]["stack_share"] - nginx_share)
    per_order = (
        (three["cpu"]["app_us"] + three["cpu"]["redis_us"])
        * three["answered"]
        / three["goodput_rps"]
        if three["goodput_rps"]
        else 0.0
    )
    three_seconds = three["planned"] / three["planned_rps"] if three["planned_rps"] else 1.0
    per_order /= three_seconds
    if not per_order:
        return []
    best = left / (per_order / 1e6)
    capacity = over["capacity_rps"]
    return [
        f"- **Goodput at 10x.** nginx spent {top['cpu']['nginx_us']:.1f} µs of stack CPU per "
        f"request at 10x ({rate:,.0f}/s answered), {nginx_share:.0%} of the stack CPU, nearly all "
        f"of it refusing; the stack's processes had {top['cpu']['stack_share']:.0%} of it (softirq "
        f"{top['cpu'].get('softirq_share', 0):.0%}, other processes "
        f"{top['cpu']['others_share']:.0%}). At the {per_order:,.0f} µs an order cost the app and "
        f"redis at 3x, the rest pays for at most {best:,.0f} orders/s = {best / capacity:.0%} of "
        f"the capacity; measured {top['goodput_rps']:,.0f}/s. 90% of the capacity at 10x would "
        "need a refusal to cost nginx about "
        f"{max(0.0, (top['cpu']['stack_share'] - 0.9 * capacity * per_order / 1e6)) / rate * 1e6 if rate else 0:.1f} µs."
    ]


def goodput_at_3x_needs(results: dict[str, Any]) -> list[str]:
    """What 90% of the capacity at 3x would take, from this run's CPU figures: nginx's cost
    per refusal (its CPU at 3x less, for each order served, what nginx spent per order
    under wrk) and an order's whole-stack cost under wrk, where the capacity comes from."""
    rows = {row["phase"]: row for row in results["overload"]["levels"]}
    three, wrk = rows.get("3x"), results["orders"].get("cpu_us")
    if not three or "cpu" not in three or not wrk or not three["planned_rps"]:
        return []
    rate = three["answered"] / (three["planned"] / three["planned_rps"])
    served = three["goodput_rps"]
    refused = rate - served
    capacity = results["overload"]["capacity_rps"]
    target = TARGETS["goodput_share_at_3x"] * capacity
    if refused <= 0 or served <= 0 or rate <= target:
        return []
    share = three["cpu"]["stack_share"]
    order_us = sum(wrk.values())
    refusing = max(0.0, three["cpu"]["nginx_us"] * rate - served * wrk["nginx"]) / 1e6
    refusal_us = refusing / refused * 1e6
    best = (share - refusing) / order_us * 1e6
    served_us = (share - refusing) / served * 1e6
    budget_us = (share - target * order_us / 1e6) / (rate - target) * 1e6
    return [
        f"- **Goodput at 3x.** {refused:,.0f} refusals/s cost nginx about {refusal_us:.1f} µs "
        f"each (its CPU at 3x less the {wrk['nginx']:,.0f} µs per order it spends under wrk): "
        f"{refusing:.0%} of the stack CPU. At the {order_us:,.0f} µs of stack CPU an order "
        f"costs under wrk (where the capacity comes from), the rest of the stack's "
        f"{share:.0%} pays for at most {best:,.0f} orders/s = {best / capacity:.0%} of the "
        f"capacity; measured {served:,.0f}/s, so an order served at 3x cost about "
        f"{served_us:,.0f} µs. 90% of the capacity at 3x needs both: refusals at most "
        + (
            f"{budget_us:.1f} µs each, and every order no dearer than under wrk."
            if budget_us > 0
            else "free, and orders cheaper than under wrk: out of reach on this stack CPU."
        )
    ]


def findings(results: dict[str, Any]) -> str:
    """What the figures say (computed), and the standing facts behind them."""
    a = results["hello"]["ok_rps"]
    orders = results["orders"]["ok_rps"]
    b = results["ceiling_b"]["rps"]
    b_everysec = results["ceiling_b_everysec"]["rps"]
    mem = results["memory"]
    over = results["overload"]
    invalid = [row for row in over["levels"] if not row["valid"]]
    reasons = []
    for row in invalid:
        if row["generator_lag_p99_ms"] > 100:
            reasons.append(
                f"at {row['phase']} the generator itself wrote requests late even on open "
                f"connections (lag p99 {row['generator_lag_p99_ms']:,.0f} ms): a limit of the "
                "rig's one load CPU (shared with other work on this box, and doing the kernel's "
                "loopback TCP work for every request it sends)"
            )
        elif row["waited_for_connection"]:
            reasons.append(
                f"at {row['phase']} {row['waited_for_connection']:,} requests were sent late "
                "for want of a connection: the stack held the generator's connections with "
                "unanswered requests and did not accept new ones fast enough"
            )
        else:
            reasons.append(f"at {row['phase']} the cause is not in the figures")
    lines = [
        f"- **The rig.** {over['split']}. Pinning read back from /proc: "
        f"{over['pinning']['checked']} stack threads, "
        f"{len(over['pinning']['stray'])} on other CPUs. "
        + (
            "Every level offered at least 95% of its plan."
            if not invalid
            else f"Levels {', '.join(r['phase'] for r in invalid)} fell more than 5% short: "
            "their rows are marked INVALID and do not show the shop at that load: "
            + "; ".join(reasons)
            + "."
        )
        + f" The generator used {over['generator_cpu_share']:.0%} of a CPU over the run (its "
        "process time; loopback TCP's softirq work on its CPU is not counted there) and opened "
        f"{over['connections_opened']:,} connections.",
        f"- **Orders ÷ hello.** The data tier alone, with `appendfsync always`, ran the real "
        f"script at {b:,.0f}/s with redis-benchmark as its only client ({b_everysec:,.0f}/s with "
        f"everysec); orders cannot exceed that, and each order also costs app CPU on the same "
        f"stack core. 0.6 x hello = {0.6 * a:,.0f}/s; measured {orders:,.0f} orders/s = "
        f"{orders / b if b else 0:.2f} x ceiling B.",
        *goodput_at_3x_needs(results),
        *goodput_bound(over),
        f"- **Memory per order** ({mem['bytes_per_order']:.0f} bytes on one redis-server): "
        f"the order hash is {mem['order_hash_bytes']:.0f} bytes; index shares: "
        + ", ".join(f"{k} {v:.0f}" for k, v in mem["index_share_bytes"].items())
        + ". A partition's status lists are in chunks of 128 orders, each a listpack, and "
        "the order hash stores no derivable field (docs/data-tier.md section 10.2).",
        f"- **Shared machine.** Load average was {results['environment']['loadavg_before']:.1f} "
        "when the bench started: other processes on the box take CPU from every figure here.",
    ]
    return "\n".join(lines)


def render(results: dict[str, Any]) -> str:
    env, over = results["environment"], results["overload"]
    targets = overload_targets(results)
    target_table = ["| measure | result | target | |", "|---|---|---|---|"]
    target_table += [f"| {m} | {r} | {t} | {ok} |" for m, r, t, ok in targets]
    ceilings = ["| measurement | result | detail |", "|---|---|---|"]
    ceilings += [f"| {m} | {r} | {d} |" for m, r, d in ceilings_rows(results)]
    storage = ["| measurement | result | detail | target | |", "|---|---|---|---|---|"]
    storage += [f"| {' | '.join(row)} |" for row in storage_rows(results)]
    extra = "".join(
        f"\n## {section['title']}\n\n{section['markdown']}\n" for section in results["sections"]
    )
    return f"""# PhoneShop benchmark

Produced by `make bench` (`python -m loadtests.bench`) on {env["when"]}, in {env["duration_s"]:.0f} s.
Machine: {env["machine"]}.

**Rig.** {over["split"]} (STACK_CPUS / LOAD_CPUS move it). The stack is nginx (1 worker
process) -> {env["instances"]} gunicorn instances x {env["workers"]} worker (aiohttp, uvloop) -> one
redis-server 7 with AOF, `appendfsync {results["ceiling_b"]["appendfsync"]}`; the app writes its JSON access
log to a file, as `make run` does; no mail worker. Ceilings
are wrk (closed loop, {env["wrk"]}). The overload levels are open loop
(loadtests/openloop.py): every request is due at a fixed time whatever the answers do, its
latency counts from that due time, and each level reports the rate actually sent; a level that
sent less than 95% of its plan is marked INVALID. Capacity is the wrk POST /orders rate, measured
first; the levels are multiples of it. Limits: nginx {env["limits"]}; the app's own
overload control as configured by default.

![overload levels and their timeline](bench.png)

## Issue 12's targets, from this run

{chr(10).join(target_table)}

Targets are reported, not asserted. Recovery: from the start of the recovery phase until every
0.5 s window to its end has no refusal, no failure and an accepted p99 within 2x the half-load p99.

## Overload levels: POST /orders through nginx, open loop, capacity {over["capacity_rps"]:,.0f}/s

{levels_table(over)}

Stack CPU per level: CPU time of nginx, the app instances and redis (process trees, /proc), sampled
every 0.5 s during the run and cut at the level's ends. Shares are of the stack CPUs over the
level: the stack's processes; softirq, the kernel's network work, which no process is charged
for (loopback TCP to and from the stack, mostly); and other processes, the rest of the time those
CPUs were busy (this box's other work). Per request is per request of that level, refused or served.

Processes after the run: {over["processes"]["detail"]}.

## A/B in one run (alternating rounds of wrk POST /orders, both stacks on the same stack CPU)

Per round: wrk's orders/s, and the CPU used per request by the app instances (masters and
workers) and by the whole stack (with redis and nginx), read from /proc before and after the
round. On this shared box throughput swings with other work between rounds; CPU per request
moves much less, so it is the measure of what a change saves.

{ab_table(results["ab"])}

## Ceilings

{chr(10).join(ceilings)}

## Where the stack's CPU goes: a hello against an order (P1)

CPU time of each part of the stack (its process tree, from /proc) during the wrk runs above
(64 connections), per answer served; for orders the few refusals are paid by the orders served.

{cost_section(results)}

## Lists and memory

{chr(10).join(storage)}

{list_cost_text(results)}
## What the figures say

{findings(results)}

## Profile of the order hot path

{chr(10).join(profile_lines(results.get("profile", {})))}
{extra}
Raw folded stacks, the open-loop generator's per-request rows and every figure as JSON are in
`loadtests/reports/bench/`.
"""
