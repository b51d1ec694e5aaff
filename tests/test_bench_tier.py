"""make bench's data-tier section (loadtests/bench_tier.py) and its one-redis-server A/B
(loadtests/ab_refs.py): the recorded order calls replay to the same data on a real cluster,
a replay that differs is caught, the split into pipes keeps each partition's order, and
the figures and verdicts follow from the rows; a section that fails is reported in
BENCH.md instead of losing the run. No timing is asserted."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import keys
from app.ops.redis_cluster import LocalCluster, client
from app.orders import grants
from app.orders.stripes import DRY_S, STRIPE_HINTS
from app.partitions import PARTITIONS, partition_for_email, slot
from app.scripts import SCRIPT_NAMES
from loadtests import bench_tier, rig
from loadtests.ab_refs import one_node_markdown
from loadtests.bench import measured_section
from loadtests.bench_tier import (
    AT_THE_CEILING,
    ESCROW_WIRED,
    WORKLOADS,
    Call,
    NotTheRun,
    Prepared,
    Recording,
    Workload,
    alike_pipes,
    alternated,
    by_node,
    call_argv,
    connected_clients,
    customer_emails,
    escrow_options,
    fewest_calls,
    flush,
    in_the_order_run,
    logged_args,
    markdown,
    phone_shares,
    pipe,
    record,
    replay,
    replayed_together,
    shard_figures,
    streams,
    verdicts,
)

UNPINNED = rig.CpuSplit(frozenset(), frozenset())


def call_on(partition: int, n: int) -> Call:
    return Call("reserve_stock", "0" * 40, (keys.reservations(partition),), (str(n),))


@pytest.mark.parametrize("count", [1024, 1000, 50, 12])
def test_the_customers_fill_every_partition_alike(count: int) -> None:
    """As a shop's many customers do by their e-mails' hash: 1,024 taken as they come put
    from 2 to 14 in a partition, and a third more on one primary than on another."""
    emails = customer_emails(count)
    assert len(set(emails)) == count
    per_partition = Counter(partition_for_email(email) for email in emails)
    assert len(per_partition) == min(count, PARTITIONS)
    assert max(per_partition.values()) - min(per_partition.values()) <= 1
    assert max(per_partition.values()) == -(-count // PARTITIONS)


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


def test_calls_across_partitions_keep_their_order_with_each_partitions_calls() -> None:
    """A script across slots (a stripe order: its customer's partition declared, the
    host's undeclared) and the host's own calls (a grant's receipt) stay on one
    connection in their recorded order, however many connections there are."""
    order = Call("place_from_stripe", "1" * 40, (keys.reservations(3),), ("1",),
                 (keys.reservations(70),))  # fmt: skip
    calls = [call_on(70, 0), order, call_on(70, 1), call_on(5, 2), call_on(3, 3)]
    split = streams(calls, 8)
    [together] = [stream for stream in split if order in stream]
    assert together == [calls[0], order, calls[2], calls[4]]
    assert [calls[3]] in split  # partition 5 is its own


def test_calls_are_replayed_in_the_order_their_node_ran_them() -> None:
    """The slow log's order (its ids), not the answers': where one call is not in it,
    the answers' order for all, and how many were not found."""
    a, b, c = call_on(1, 0), call_on(1, 1), call_on(2, 2)
    ids = {logged_args(call_argv(b)): [5], logged_args(call_argv(a)): [9],
           logged_args(call_argv(c)): [7]}  # fmt: skip
    assert in_the_order_run([a, b, c], lambda call: 7001, {7001: ids}) == ([b, c, a], 0)
    # Two calls alike (the slow log's first 31 arguments): taken in the log's order.
    twice = {logged_args(call_argv(a)): [3, 8]}
    assert in_the_order_run([a, a], lambda call: 7001, {7001: twice}) == ([a, a], 0)
    missing = {logged_args(call_argv(a)): [9]}
    assert in_the_order_run([a, b, c], lambda call: 7001, {7001: missing}) == ([a, b, c], 2)


def test_calls_go_to_the_node_serving_their_first_keys_slot() -> None:
    calls = [call_on(p, p) for p in (0, 1, 64, 127)]
    nodes = by_node(calls, lambda s: 7001 if s < slot(64) else 7002)
    assert {port: [c.args[0] for c in cs] for port, cs in nodes.items()} == {
        7001: ["0", "1"],
        7002: ["64", "127"],
    }


def test_every_primary_is_replayed_over_as_many_pipes() -> None:
    """As many pipes for every primary of both shard counts: as many as the one whose
    calls are most linked can have (a node of 3 with stripe orders: one)."""

    def ready_with(*calls_by_port: list[Call]) -> Prepared:
        order_calls = dict(enumerate(calls_by_port))
        return Prepared(None, None, list(order_calls), order_calls, {})  # type: ignore[arg-type]

    apart = [call_on(partition, 0) for partition in range(16)]
    linked = [
        Call(
            "place_from_stripe", "1" * 40, (keys.reservations(p),), ("1",), (keys.reservations(99),)
        )
        for p in range(16)
    ]
    one = ready_with(apart)
    assert alike_pipes([one], 8) == 8 and alike_pipes([one], 4) == 4
    assert alike_pipes([one, ready_with(apart[:8], linked)], 8) == 1
    assert alike_pipes([one, ready_with(apart[:3], apart[3:])], 8) == 3
    assert fewest_calls([ready_with(apart[:3], apart[3:])]) == 3


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


TINY = Workload("tiny", phones=8, orders=20, customers=8)


def _recorded(cluster: LocalCluster, workload: Workload = TINY) -> Recording:
    ports = [node.port for node in cluster.topology().primaries()]
    return asyncio.run(record(ports, workload, inflight=4))


def test_the_pipes_are_connected_before_the_clock_starts(
    one_primary: LocalCluster, tmp_path: Path
) -> None:
    """The clock of a timed pipe starts once every redis-cli runs and is connected, and
    ``at_start`` (the CPU counters' first reading) sees that and no call run yet."""
    [port] = [node.port for node in one_primary.topology().primaries()]
    calls = [Call("SET", "", (f"pipe-{n}",), ("v",)) for n in range(300)]
    before = connected_clients(port)
    seen: dict[str, int] = {}

    def at_start() -> None:
        seen["clients"] = connected_clients(port)
        with client(port) as node:
            seen["keys"] = node.dbsize()

    assert pipe(port, calls, 3, tmp_path, None, at_start=at_start) > 0
    assert seen == {"clients": before + 3, "keys": 0}
    with client(port) as node:
        assert node.dbsize() == 300


def test_the_recorded_orders_replay_to_the_same_keys(
    one_primary: LocalCluster, tmp_path: Path
) -> None:
    recording = _recorded(one_primary)
    first = recording.first_order_call
    order_calls = recording.order_calls()
    assert first > 0 and len(order_calls) >= 20  # the creations, then at least a call an order
    assert recording.orders_placed == 20
    assert {call.script for call in recording.calls} <= set(SCRIPT_NAMES)
    assert not recording.failed and not recording.not_replayed
    # replay raises unless every primary holds exactly the keys the recording left and the
    # audit holds with the 20 orders.
    [row] = replay(one_primary, recording, 3, tmp_path / "replay", UNPINNED)
    assert row["calls"] == len(order_calls)
    assert sum(row["scripts"].values()) == len(order_calls)
    assert row["cpu_s"] > 0 and row["wall_s"] > 0


def test_no_aof_rewrite_forks_inside_the_measured_window(
    one_primary: LocalCluster, tmp_path: Path
) -> None:
    recording = _recorded(one_primary)
    [node] = one_primary.topology().primaries()
    with bench_tier.client(node.port) as primary:
        # A rule that rewrites at once: every few writes would fork without the rebase.
        primary.config_set("auto-aof-rewrite-min-size", 1)
        primary.config_set("auto-aof-rewrite-percentage", 1)
        try:
            before = int(primary.info("persistence")["aof_rewrites"])
            [row] = replay(one_primary, recording, 3, tmp_path / "replay", UNPINNED)
            after = int(primary.info("persistence")["aof_rewrites"])
            rule = primary.config_get("auto-aof-rewrite-percentage")
        finally:
            primary.config_set("auto-aof-rewrite-min-size", 64 * 1024 * 1024)
            primary.config_set("auto-aof-rewrite-percentage", 100)
    assert row["forks"] == 0
    assert after > before  # the rebase ran, before the window
    assert rule == {"auto-aof-rewrite-percentage": "0"}


def test_a_replay_that_leaves_other_keys_fails(one_primary: LocalCluster, tmp_path: Path) -> None:
    recording = _recorded(one_primary)
    creations = recording.calls[: recording.first_order_call]
    # Replaying without the last customer's creation leaves fewer keys than the recording.
    recording.calls = creations[:-1] + recording.order_calls()
    recording.first_order_call -= 1
    with pytest.raises(RuntimeError, match="keys per node"):
        replay(one_primary, recording, 3, tmp_path / "replay", UNPINNED)


def test_a_replay_short_of_an_order_fails_the_audit(
    one_primary: LocalCluster, tmp_path: Path
) -> None:
    """The audit after the replay counts the orders: a recording that says the app placed
    one more order than its calls place fails, though every node's keys match."""
    recording = _recorded(one_primary)
    recording.orders_placed += 1
    with pytest.raises(RuntimeError, match="21"):
        replay(one_primary, recording, 3, tmp_path / "replay", UNPINNED)


def test_a_recording_whose_replay_is_not_its_run_is_made_again(
    one_primary: LocalCluster, tmp_path: Path
) -> None:
    bad = _recorded(one_primary)
    bad.orders_placed += 1  # its replay's audit cannot hold: not its run

    def again() -> Recording:
        flush(one_primary)
        return _recorded(one_primary)

    recorded = {1: (one_primary, bad)}
    medians = alternated(recorded, 2, 3, tmp_path / "replays", UNPINNED, {1: again})
    assert recorded[1][1] is not bad and recorded[1][1].discarded == 1
    assert medians[1][0]["calls"] == len(recorded[1][1].order_calls())
    # Without a way to record again, the run stops there.
    with pytest.raises(RuntimeError):
        alternated({1: (one_primary, bad)}, 1, 3, tmp_path / "again", UNPINNED)


@pytest.fixture(scope="module")
def three_primaries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster.on_free_ports(tmp_path_factory.mktemp("cluster3"), 3, replicas=0)
    cluster.start()
    yield cluster
    cluster.stop()


def test_both_shard_counts_replay_together_in_slices_each_call_once(
    one_primary: LocalCluster,
    three_primaries: LocalCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flush(three_primaries)
    recorded = {
        1: (one_primary, _recorded(one_primary)),
        3: (three_primaries, _recorded(three_primaries)),
    }
    monkeypatch.setattr(bench_tier, "SLICE_CALLS_MIN", 1)  # 20 orders: slices of a few calls
    rows = replayed_together(recorded, 3, tmp_path / "together", UNPINNED, parts=4)
    # 4 slices, fewer when a primary has fewer calls than that (20 orders over 3 primaries).
    view = three_primaries.topology()
    on_node = by_node(recorded[3][1].order_calls(), lambda s: view.primary_for_slot(s).port)
    fewest = min(len(on_node.get(node.port, [])) for node in view.primaries())
    parts = max(1, min(4, fewest, len(recorded[1][1].order_calls())))
    sent = {part for _, recording in recorded.values() for part, _, _ in recording.encoded}
    assert {f"orders {k}/{parts}" for k in range(parts)} <= sent
    for n, (_, recording) in recorded.items():
        assert len(rows[n]) == n  # a row per primary, each the sum of its 4 slices
        wanted = Counter(call.script for call in recording.order_calls())
        assert sum(row["calls"] for row in rows[n]) == sum(wanted.values())
        assert sum((Counter(row["scripts"]) for row in rows[n]), Counter()) == wanted
        assert all(row["cpu_s"] > 0 and row["forks"] == 0 for row in rows[n] if row["calls"])
    # checked() ran on both: a recording that is not its run is named by its shard count.
    recorded[3][1].orders_placed += 1
    with pytest.raises(NotTheRun) as caught:
        replayed_together(recorded, 3, tmp_path / "again", UNPINNED, parts=2)
    assert set(caught.value.errors) == {3}


def test_a_hot_workload_records_the_split_saga_and_its_settles_inside_the_window(
    three_primaries: LocalCluster, tmp_path: Path
) -> None:
    """The hot workload at a tiny size on 3 primaries: every order is placed, the apart
    ones by the saga whose settles (sent by the settler after the answers) are in the
    recording's order window, and the replay is audited."""
    flush(three_primaries)
    hot = dataclasses.replace(WORKLOADS["hot"], phones=4, orders=120, customers=12)
    recording = _recorded(three_primaries, hot)
    assert recording.orders_placed == 120
    by_name = recording.calls_by_name()
    # A third of the orders collapse (customer and phone on one primary), the rest split.
    assert by_name["place_order"] + by_name["commit_order"] == 120
    assert by_name["reserve_stock"] == by_name["commit_order"] > 0
    assert 0 < by_name["settle_reservation"] <= by_name["commit_order"]
    shares = phone_shares(three_primaries, recording, hot)
    assert len(shares) == 3 and sum(shares) == pytest.approx(1.0)
    rows = replay(three_primaries, recording, 2, tmp_path / "replay", UNPINNED)
    assert sum(row["calls"] for row in rows) == len(recording.order_calls())
    replayed = Counter()
    for row in rows:
        replayed.update(row["scripts"])
    assert dict(replayed) == by_name
    # Without the settles the replay leaves units held: not the recording's run.
    recording.calls = [c for c in recording.calls if c.script != "settle_reservation"]
    with pytest.raises(RuntimeError):
        replay(three_primaries, recording, 2, tmp_path / "again", UNPINNED)


def test_what_the_service_sends_after_its_answers_is_recorded(
    one_primary: LocalCluster, tmp_path: Path
) -> None:
    """Off the request path: a task the order path leaves behind, and a call it schedules
    for later (as the settler's gathered flush), are both waited for and recorded, even
    plain commands that are no script, single or pipelined; and they are replayed."""
    ports = [node.port for node in one_primary.topology().primaries()]
    late = "bench-tier-late"

    async def placing() -> Recording:
        original = bench_tier.order_path

        def leaving_work_behind(scripts: Any, settler: Any, options: Any = None) -> Any:
            place = original(scripts, settler, options)

            async def placed(customer_id: str, lines: Any, request_id: str) -> Any:
                order = await place(customer_id, lines, request_id)
                loop = asyncio.get_running_loop()
                gateway = scripts.gateway

                def later() -> None:
                    key = f"{late}:{request_id}"
                    for sent in (
                        gateway.execute("SET", key, 1),
                        gateway.execute_many([("HSET", f"{key}:h", "f", 1), ("GET", key)]),
                    ):
                        task = loop.create_task(sent)
                        pending.add(task)
                        task.add_done_callback(pending.discard)

                loop.call_later(0.2, later)
                return order

            return placed

        pending: set[asyncio.Task[Any]] = set()
        bench_tier.order_path = leaving_work_behind
        try:
            return await record(ports, TINY, inflight=4)
        finally:
            bench_tier.order_path = original

    flush(one_primary)
    recording = asyncio.run(placing())
    by_name = recording.calls_by_name()
    assert (by_name["SET"], by_name["HSET"], by_name["GET"]) == (20, 20, 20)
    late_keys = {call.keys[0] for call in recording.order_calls() if call.script != "place_order"}
    assert len(late_keys) == 40 and all(str(key).startswith(late) for key in late_keys)
    # Replayed inside the window: the keys match the recording's only with them.
    [row] = replay(one_primary, recording, 3, tmp_path / "replay", UNPINNED)
    assert (row["scripts"]["SET"], row["scripts"]["HSET"]) == (20, 20)


def test_the_workloads_draw_the_same_orders_every_run() -> None:
    assert WORKLOADS["uniform"].picks()[:3] == [(0, 0), (1, 7), (2, 14)]  # as it always was
    hot, zipf = WORKLOADS["hot"], WORKLOADS["zipf"]
    assert (hot.phones, hot.orders, zipf.phones, zipf.orders) == (64, 60_000, 1024, 60_000)
    assert hot.picks() == hot.picks()
    # A warm-up's orders are drawn with the measured ones, first.
    warmed = dataclasses.replace(hot, warm_up=100)
    assert len(warmed.picks()) == hot.orders + 100 and warmed.picks() == warmed.picks()
    # At least 100 orders per phone and primary (3 primaries): quotas can be reused.
    assert hot.orders / (hot.phones * 3) >= 100
    phones = Counter(phone for _, phone in hot.picks())
    assert len(phones) == 64 and min(phones.values()) > 200
    # Zipf(1) over 1,024 phones: rank 1 takes 1 / H(1024) of the orders (about 13%),
    # rank 2 half as many.
    ranked = Counter(phone for _, phone in zipf.picks())
    harmonic = sum(1 / rank for rank in range(1, 1025))
    assert abs(ranked[0] / zipf.orders - 1 / harmonic) < 0.01
    assert 1.7 < ranked[0] / ranked[1] < 2.3
    customers = Counter(customer for customer, _ in zipf.picks())
    assert len(customers) == 1024


def test_escrow_keywords_beside_the_wired_ones_are_switched_on_or_said_unknown() -> None:
    def without(*, customer_id: str) -> None: ...

    def with_switch(*, customer_id: str, escrow_stripes: bool = False) -> None: ...

    def with_a_rule(
        *, customer_id: str, striping_rule: str = "", stripes: bool = False
    ) -> None: ...

    assert escrow_options(without) == ({}, "")
    assert escrow_options(with_switch) == ({"escrow_stripes": True}, "")
    # A switch of another shape is not guessed at, and said so (nothing passed at all)...
    options, note = escrow_options(with_a_rule)
    assert options == {} and note.startswith("unknown: place_order takes striping_rule=''")
    # ...unless escrow_on wires it as the handler does.
    assert escrow_options(with_a_rule, wired=["striping_rule"]) == ({"stripes": True}, "")
    # Today's order path: every escrow keyword it takes is wired.
    assert escrow_options(wired=ESCROW_WIRED) == ({}, "")


def test_a_hot_workload_with_escrow_on_has_its_grants_and_stripe_orders_in_the_window(
    three_primaries: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Escrow switched on as the app does with ESCROW_STRIPES=1: a hot phone is striped by
    its reserves, granted to the other primaries' hosts off the request path, and then sold
    from its stripes; the grants (reserve, receipt, settle) and the stripe orders are in
    the recording's order window, and the replay of them holds the keys and the audit. Two
    phones for 400 orders make stripes so hot that a receipt and a stripe order are often
    answered in the other order than their node ran them: such a recording is made again
    (alternated), as make bench does."""
    ports = [node.port for node in three_primaries.topology().primaries()]
    hot = dataclasses.replace(WORKLOADS["hot"], phones=2, orders=400, customers=12)

    def recorded() -> Recording:
        flush(three_primaries)
        return asyncio.run(record(ports, hot, inflight=2, escrow=True))

    monkeypatch.setattr(bench_tier, "RECORD_ATTEMPTS", 8)
    runs = {3: (three_primaries, recorded())}
    [medians] = alternated(runs, 1, 2, tmp_path / "replay", UNPINNED, {3: recorded}).values()
    recording = runs[3][1]
    assert recording.unordered == 0  # every call found in its node's slow log
    assert recording.escrow.startswith("ESCROW_STRIPES=1: striping rule")
    assert recording.orders_placed == 400
    by_name = recording.calls_by_name()
    assert by_name["reserve_grant"] > 0 and by_name["receive_grant"] > 0
    assert by_name["place_from_stripe"] > 0
    replayed = sum(row["scripts"].get("place_from_stripe", 0) for row in medians)
    assert replayed == by_name["place_from_stripe"]
    # Without the grants' receipts the stripes sell units they never got: not this run.
    recording.calls = [c for c in recording.calls if c.script != "receive_grant"]
    with pytest.raises(RuntimeError):
        replay(three_primaries, recording, 2, tmp_path / "again", UNPINNED)


def test_a_warm_up_is_replayed_unmeasured_and_the_windows_stretched(
    three_primaries: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As at the ceiling (as_at_the_ceiling): the warm-up's orders are placed first and
    their calls, striping and first grants included, go before the measured window (the
    replay sends them unmeasured with the creations, and its audit counts their orders);
    the striping rule the reserves carry has the horizon stretched by the time scale."""
    ports = [node.port for node in three_primaries.topology().primaries()]
    hot = dataclasses.replace(WORKLOADS["hot"], phones=2, orders=200, customers=12, warm_up=200)
    scale = 3.0

    def recorded() -> Recording:
        flush(three_primaries)
        return asyncio.run(record(ports, hot, inflight=2, time_scale=scale, escrow=True))

    monkeypatch.setattr(bench_tier, "RECORD_ATTEMPTS", 8)
    runs = {3: (three_primaries, recorded())}
    [medians] = alternated(runs, 1, 2, tmp_path / "replay", UNPINNED, {3: recorded}).values()
    recording = runs[3][1]
    assert (recording.warm_up_placed, recording.orders_placed) == (200, 200)
    warm = Counter(call.script for call in recording.calls[: recording.first_order_call])
    measured = recording.calls_by_name()
    # Each phase's 200 orders: collapsed, by the saga's commit, or from a stripe (a stripe
    # that was short answers nothing and the saga places that order).
    for calls in (warm, measured):
        by_one_script = calls.get("place_order", 0) + calls.get("commit_order", 0)
        assert by_one_script <= 200 <= by_one_script + calls.get("place_from_stripe", 0)
    # The phones were striped and granted in the warm-up, before the window.
    assert warm["reserve_grant"] > 0 and warm["receive_grant"] > 0
    assert measured.get("reserve_stock", 0) < warm["reserve_stock"]
    rules = {
        bench_tier._text(call.args[-1])
        for call in recording.calls
        if call.script == "reserve_stock"
    }
    assert rules == {grants.striping_rule(round(grants.HORIZON_MS * scale))}
    # The worker's own pause for a dry stripe is the app's again once the recording ended.
    assert STRIPE_HINTS.dry_s == DRY_S
    # Only the measured orders' calls are timed; the creations were sent before the
    # warm-up, apart (a collapsed order reads its phone undeclared: no stream keeps it
    # after its phone's creation).
    assert sum(row["calls"] for row in medians) == len(recording.order_calls())
    creations = {call.script for call in recording.calls[: recording.first_warm_up_call]}
    assert creations == {"create_phone", "create_customer"}
    assert list((tmp_path / "replay" / "p3" / "warm-up").glob("*.resp"))


def row(calls: int, cpu_s: float, wall_s: float, busy_s: float = 0.0) -> dict[str, Any]:
    scripts = {"commit_order": calls // 2, "reserve_stock": calls - calls // 2}
    return {"port": 1, "calls": calls, "scripts": scripts, "cpu_s": cpu_s, "wall_s": wall_s,
            "stack_busy_s": busy_s, "forks": 0}  # fmt: skip


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
    even["orders_per_s_recorded"] = 400.0
    for figures in (one, even, uneven):
        figures["not_replayed_per_order"] = {}
    ceiling = {"time_scale": 30.0, "settle_window_s": 1.5, "warm_up": 0, "p1": one, "p3": even,
               "ratios": ratios}  # fmt: skip

    def measured(name: str, orders: int, three: dict[str, Any], **more: Any) -> dict[str, Any]:
        workload = {"name": name, "phones": 64, "customers": 8,
                    "described": f"{orders:,} orders of {name}"}  # fmt: skip
        return {"workload": workload, "escrow": "", "replays": 3, "p1": one, "p3": three,
                "ratios": verdicts(one, three), **more}  # fmt: skip

    hot = measured("hot", 20_000, even, escrow_asked=True)
    hot["p3"] = {**even, "not_replayed_per_order": {"PING": 0.01}}
    text = markdown(
        {
            "workloads": {
                "uniform": measured(
                    "uniform", 2000, uneven, escrow_asked=False, at_the_ceiling=ceiling
                ),
                "hot": hot,
            },
            "split": "x",
            "load_average": [1.0, 2.0],
            "not_measured": {"zipf": "RuntimeError('no run')"},
        }
    )
    assert "Workload `zipf` not measured: `RuntimeError('no run')`" in text
    assert (
        "| Redis CPU µs per order, summed over the primaries (a) | 1000.0 | 1100.0 | 1.10 | ≤ 1.3 met |"
        in text
    )
    assert (
        "orders / busiest primary's CPU s (b) | 1,000 | 1,250 | 1.25 | ≥ 2.5 **missed** |" in text
    )
    assert "0.73 / 0.14 / 0.14" in text  # each primary's share of the CPU
    assert "| the same, by script | commit_order 1.25, reserve_stock 1.25 |" in text
    # The second table, as at the ceiling, is judged on its own rows.
    assert "the order path's windows 30.0 times the app's (the settler's 1.50 s instead of" in text
    assert "orders / busiest primary's CPU s (b) | 1,000 | 2,500 | 2.50 | ≥ 2.5 met |" in text
    # Every workload side by side: its parameters, (a) and (b) of each, and its calls.
    assert "| 3 primaries against 1 | uniform | hot | target |" in text
    assert "| workload | 2,000 orders of uniform | 20,000 orders of hot |  |" in text
    assert "| (a) Redis CPU per order, 3 / 1 | 1.10 met | 1.10 met | ≤ 1.3 |" in text
    assert "| (b) ceiling, derived, 3 / 1 | 1.25 **missed** | 2.50 met | ≥ 2.5 |" in text
    # The uniform workload as at the ceiling; the hot one was not measured so.
    assert (
        f"| the same, as at the 3-primary ceiling ({AT_THE_CEILING}) | 2.50 met | not measured"
        " | ≥ 2.5 |" in text
    )
    assert (
        "| as at the 3-primary ceiling: the windows, times the app's; warm-up orders | 30.0; 0 | · |"
        in text
    )
    assert "| the same: script calls per order (1 / 3 primaries) | 2.50 / 2.50 | · |" in text
    assert "| escrow (docs/escrow.md) | off | off: the app has no escrow switch yet" in text
    assert "| commit_order | 1.25 / 1.25 | 1.25 / 1.25 |" in text
    assert "not replayed (no key to route them by), per order: hot (3 primaries): PING 0.01" in text


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
