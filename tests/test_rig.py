"""The load rig (loadtests/rig.py, loadtests/openloop.py) without timing assertions:
the CPU split, pinning applied to a real process tree, the open-loop generator
against the real stack, and the marking of a level its generator under-offered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import pytest

from app.ops.poll import wait_until
from loadtests import rig
from loadtests.openloop import NO_ANSWER
from loadtests.support.stack import FullStack

pytestmark = pytest.mark.timeout(120)


# ---- the CPU split ------------------------------------------------------------------------


def test_parse_cpus_reads_lists_and_ranges() -> None:
    assert rig.parse_cpus("0") == {0}
    assert rig.parse_cpus("0-2,5") == {0, 1, 2, 5}
    for bad in ("", "a", "3-1", "1-", "-1"):
        with pytest.raises(ValueError):
            rig.parse_cpus(bad)


def test_default_split_gives_the_stack_the_first_half() -> None:
    split = rig.cpu_split({}, available=[0, 1])
    assert (split.stack, split.load) == ({0}, {1})
    four = rig.cpu_split({}, available=[0, 1, 2, 3])
    assert (four.stack, four.load) == ({0, 1}, {2, 3})


def test_split_is_configurable_and_must_be_disjoint() -> None:
    split = rig.cpu_split({"STACK_CPUS": "1", "LOAD_CPUS": "0"}, available=[0, 1])
    assert (split.stack, split.load) == ({1}, {0})
    only_stack = rig.cpu_split({"STACK_CPUS": "0-1"}, available=[0, 1, 2])
    assert (only_stack.stack, only_stack.load) == ({0, 1}, {2})
    with pytest.raises(ValueError, match="overlap"):
        rig.cpu_split({"STACK_CPUS": "0-1", "LOAD_CPUS": "1"}, available=[0, 1])
    with pytest.raises(ValueError, match="not available"):
        rig.cpu_split({"STACK_CPUS": "0", "LOAD_CPUS": "7"}, available=[0, 1])
    with pytest.raises(ValueError, match="at least one"):
        rig.cpu_split({"STACK_CPUS": "0-1"}, available=[0, 1])


def test_one_cpu_is_not_split() -> None:
    split = rig.cpu_split({}, available=[0])
    assert not split.pinned
    assert "not pinned" in split.describe()


# ---- pinning a real process tree ---------------------------------------------------------------


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to show a change")
def test_pin_tree_pins_every_thread_of_every_descendant() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    # A parent that forks a child, each sleeping: two processes, both on every CPU.
    script = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\nelse:\n    time.sleep(60)\n"
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        wait_until(lambda: len(rig.process_tree(parent.pid)) >= 2, "the fork", 10)
        tree = rig.process_tree(parent.pid)
        assert len(tree) == 2
        assert all(aff == set(cpus) for aff in rig.tree_affinity(parent.pid).values())

        applied = rig.pin_stack([parent.pid], {cpus[-1]})

        assert applied["stray"] == [] and applied["checked"] >= 2
        affinities = rig.tree_affinity(parent.pid)
        assert set(affinities) >= set(tree)
        assert all(aff == {cpus[-1]} for aff in affinities.values())
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


def test_nginx_gets_a_better_niceness_than_the_rest_of_the_stack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 10x nginx needs more than an equal share of the stack CPU: it goes first."""
    monkeypatch.delenv("BENCH_NGINX_NICE", raising=False)
    monkeypatch.setenv("BENCH_NICE", "-10")
    assert rig.front_priority() == -15
    monkeypatch.setenv("BENCH_NICE", "-18")
    assert rig.front_priority() == -20
    monkeypatch.setenv("BENCH_NICE", "0")  # left alone: nginx too
    assert rig.front_priority() == 0
    # Raising niceness needs no privilege: two real processes, one of them "nginx".
    monkeypatch.setenv("BENCH_NICE", "10")
    monkeypatch.setenv("BENCH_NGINX_NICE", "5")
    cpus = sorted(os.sched_getaffinity(0))
    procs = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)
    ]
    try:
        applied = rig.pin_stack([p.pid for p in procs], cpus, front=[procs[1].pid])
        assert (applied["nice"], applied["front_nice"]) == (10, 5)
        assert os.getpriority(os.PRIO_PROCESS, procs[0].pid) == 10
        assert os.getpriority(os.PRIO_PROCESS, procs[1].pid) == 5
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_generators_get_their_cpu_before_other_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_LOAD_NICE", raising=False)
    monkeypatch.setenv("BENCH_NICE", "-10")
    assert rig.load_priority() == -20
    monkeypatch.setenv("BENCH_NICE", "0")
    assert rig.load_priority() == 0
    monkeypatch.setenv("BENCH_LOAD_NICE", "7")  # raising niceness needs no privilege
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=rig.pinned_to(None),
    )
    assert done.stdout.strip() == "7"


def test_pinned_to_pins_a_started_generator() -> None:
    cpu = min(os.sched_getaffinity(0))
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=rig.pinned_to({cpu}),
    )
    assert done.stdout.strip() == str([cpu])
    assert rig.pinned_to(None, nice=0) is None


# ---- figures per level ----------------------------------------------------------------------


def _rows(phase: int, start: float, rate: float, seconds: float, status: int, sent_share: float):
    """Rows for one phase: ``sent_share`` of them sent on time, the rest after its end."""
    total = round(rate * seconds)
    on_time = round(total * sent_share)
    rows = []
    for i in range(total):
        due = start + i / rate
        sent = due if i < on_time else start + seconds + 1.0
        rows.append([phase, due, sent, status, 5.0 + i % 10, 0])
    return rows


def test_an_under_offered_level_is_marked_invalid() -> None:
    phases = [
        {"name": "half", "rate": 100, "seconds": 2},
        {"name": "10x", "rate": 2000, "seconds": 2},
    ]
    result = {
        "phase_starts": [0.2, 2.2],
        "rows": _rows(0, 0.2, 100, 2, 201, 1.0) + _rows(1, 2.2, 2000, 2, 503, 0.90),
    }
    half, ten = rig.phase_figures(result, phases)
    assert half["valid"] and half["offered_rps"] == 100
    assert half["goodput_rps"] == 100 and half["refused"] == 0
    assert not ten["valid"]
    assert ten["offered_rps"] == pytest.approx(1800)
    assert ten["goodput_rps"] == 0 and ten["refused"] == 4000
    assert ten["statuses"] == {"503": 4000}


def test_a_level_within_five_percent_is_valid() -> None:
    phases = [{"name": "3x", "rate": 1000, "seconds": 2}]
    result = {"phase_starts": [0.2], "rows": _rows(0, 0.2, 1000, 2, 201, 0.96)}
    (level,) = rig.phase_figures(result, phases)
    assert level["valid"]


def test_statuses_are_classified_into_accepted_refused_business_and_failures() -> None:
    phases = [{"name": "1x", "rate": 6, "seconds": 1}]
    statuses = [201, 402, 409, 429, 503, 500, NO_ANSWER]
    rows = [[0, 0.2 + i * 0.1, 0.2 + i * 0.1, s, 10.0 * (i + 1), 0] for i, s in enumerate(statuses)]
    (level,) = rig.phase_figures({"phase_starts": [0.2], "rows": rows}, phases)
    assert level["goodput_rps"] == 1
    assert level["refused"] == 2 and level["refused_p99_ms"] == 50.0
    assert level["failures"] == 2  # the 500 and the request nobody answered
    assert level["accepted_p99_ms"] == 10.0


def test_recovery_is_when_every_later_window_is_back_to_half_load_latency() -> None:
    def window(t: float, phase: str, p99: float, refused: float = 0.0) -> dict:
        return {"t": t, "phase": phase, "p99_ms": p99, "refused_rps": refused, "failed": 0}

    windows = [
        window(0.0, "10x", 900.0, refused=500),
        window(0.5, "recovery", 400.0, refused=20),
        window(1.0, "recovery", 30.0),
        window(1.5, "recovery", 300.0),  # a relapse: recovery starts again after it
        window(2.0, "recovery", 25.0),
        window(2.5, "recovery", 20.0),
    ]
    assert rig.recovery_seconds(windows, "recovery", half_p99_ms=20.0) == 1.5
    never = [window(0.0, "recovery", 500.0), window(0.5, "recovery", 400.0)]
    assert rig.recovery_seconds(never, "recovery", half_p99_ms=20.0) is None


# ---- the open-loop generator against the real stack --------------------------------------------


def _spec(stack: FullStack, **fields) -> dict:
    port = int(stack.http_url.rsplit(":", 1)[1])
    return {"host": "127.0.0.1", "port": port, "timeout_s": 10.0, **fields}


def test_generator_sends_every_request_and_reads_every_answer(
    full_stack: FullStack, tmp_path: Path
) -> None:
    phases = [{"name": "a", "rate": 40, "seconds": 1}, {"name": "b", "rate": 80, "seconds": 1}]
    spec = _spec(full_stack, kind="get", path="/healthz", phases=phases)
    result = rig.run_openloop(spec, tmp_path, None)
    rows = result["rows"]
    assert len(rows) == 120
    assert [sum(1 for r in rows if r[0] == i) for i in (0, 1)] == [40, 80]
    assert {r[3] for r in rows} == {200}
    assert all(r[2] > 0 for r in rows)  # every one was written


async def test_generator_orders_are_placed_once_each(full_stack: FullStack, tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as http:
        response = await http.post(
            f"{full_stack.direct_url}/phones",
            json={
                "name": "Rig phone",
                "description": "for the open-loop generator",
                "image_url": "/img/rig.png",
                "price_cents": 100,
                "stock": 1000,
            },
            headers=full_stack.admin_headers,
        )
        assert response.status == 201, await response.text()
        phone = (await response.json())["phone"]["id"]
        tokens, customers = [], []
        for _ in range(3):
            response = await http.post(
                f"{full_stack.direct_url}/customers",
                json={
                    "name": "Rig",
                    "surname": "Customer",
                    "email": f"rig-{uuid.uuid4().hex}@example.com",
                    "balance_cents": 1_000_000,
                },
                headers=full_stack.admin_headers,
            )
            body = await response.json()
            tokens.append(body["token"])
            customers.append(body["customer"]["id"])
        # 15 orders over 1 s from 3 customers: below nginx's per-token write limit.
        spec = _spec(
            full_stack,
            kind="orders",
            path="/orders",
            tokens=tokens,
            phones=[phone],
            nonce=uuid.uuid4().hex[:8],
            phases=[{"name": "a", "rate": 15, "seconds": 1}],
        )
        result = rig.run_openloop(spec, tmp_path, None)
        assert sorted(r[3] for r in result["rows"]) == [201] * 15
        stored = 0
        for token in tokens:
            async with http.get(
                f"{full_stack.http_url}/orders?page=1",
                headers={"Authorization": f"Bearer {token}"},
            ) as response:
                stored += (await response.json())["total"]
        assert stored == 15


def test_a_level_starved_of_connections_is_marked_invalid(
    full_stack: FullStack, tmp_path: Path
) -> None:
    """One connection and answers that take at least 200 ms: at most 5 of the 20
    requests due in the phase's second can be written in it, whatever the speed."""
    phases = [{"name": "starved", "rate": 20, "seconds": 1}]
    spec = _spec(full_stack, kind="get", path="/bench/sleep?ms=200", phases=phases)
    spec.update(max_connections=1, connect_timeout_s=60.0)
    result = rig.run_openloop(spec, tmp_path, None)
    (level,) = rig.phase_figures(result, phases)
    assert not level["valid"]
    assert level["offered_rps"] <= 6
    assert level["waited_for_connection"] > 0
    assert level["statuses"] == {"200": 20}  # late, but every one answered


def test_a_request_without_a_connection_in_time_is_given_up(
    full_stack: FullStack, tmp_path: Path
) -> None:
    """The same starved level with a 2 s connect time-out: the last request cannot be
    written before 20 x 200 ms of answers ahead of it, so it is given up unanswered."""
    phases = [{"name": "starved", "rate": 20, "seconds": 1}]
    spec = _spec(full_stack, kind="get", path="/bench/sleep?ms=200", phases=phases)
    spec.update(max_connections=1, connect_timeout_s=2.0)
    result = rig.run_openloop(spec, tmp_path, None)
    (level,) = rig.phase_figures(result, phases)
    assert level["failures"] >= 1
    assert set(level["statuses"]) == {"0", "200"}
    assert sum(level["statuses"].values()) == 20


def test_cpu_per_phase_cuts_cumulative_counters_at_the_phase_ends() -> None:
    # A counter growing 1 s per s from wall time 100; phases of 2 s and 3 s starting
    # 0.5 s after the generator's epoch 100.0, samples every second.
    samples = [(100.0 + t, {"app": float(t), "nginx": 2.0 * t}) for t in range(8)]
    phases = [{"name": "a", "seconds": 2.0}, {"name": "b", "seconds": 3.0}]
    used = rig.cpu_per_phase(samples, 100.0, phases, [0.5, 2.5])
    assert used == [{"app": 2.0, "nginx": 4.0}, {"app": 3.0, "nginx": 6.0}]


def test_busy_seconds_of_a_cpu_grow_while_it_works() -> None:
    cpu = min(os.sched_getaffinity(0))
    before = rig.cpu_times([cpu])["cpus_busy"]
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass",
        ],
        check=True,
        preexec_fn=rig.pinned_to({cpu}, nice=0),
    )
    after = rig.cpu_times([cpu])
    assert after["cpus_busy"] - before >= 0.25
    assert 0 <= after["cpus_softirq"] <= after["cpus_busy"]
