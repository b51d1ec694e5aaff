"""The honest load rig: the stack and the load generator on disjoint CPUs, open-loop
levels, and what each level really offered.

* **CPU split.** ``STACK_CPUS`` and ``LOAD_CPUS`` (lists like ``0`` or ``0-1,3``)
  say which CPUs the stack (redis, app instances, nginx, the mail processes) and
  the generators (the open-loop generator, wrk, Locust) may use. By default
  the first half of the CPUs this process may use goes to the stack and the
  rest to the generators: on this 2-core box, CPU 0 and CPU 1. The two sets
  must not overlap. With one CPU there is nothing to split: the report says so.
* **Pinning.** :func:`pin_tree` sets the affinity of a process, every thread of
  it and every descendant (gunicorn workers, nginx workers, redis's bio
  threads); processes forked later inherit it. :func:`tree_affinity` reads it
  back, so the report shows what was applied, not what was asked.
* **Priority.** On a box shared with other work, the stack and the generators
  get niceness BENCH_NICE (-10 by default when allowed): otherwise a generator
  that needs a fifth of a CPU still wakes up late behind other processes.
  nginx gets BENCH_NGINX_NICE (5 better): its refusals must not wait behind
  the app's work on the one stack CPU (:func:`front_priority`). The
  generators get BENCH_LOAD_NICE (10 better, :func:`load_priority`).
* **Levels.** :func:`phase_figures` turns the generator's per-request rows
  (loadtests/openloop.py) into, per phase: the rate asked for and the rate
  actually offered (requests written within the phase's window), whether the
  level is valid (offered within 5% of the plan), accepted p50/p99, goodput,
  refused p99, the status mix and the failures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.env import env_int
from app.ops.instances import ROOT

# A level whose generator offered less than this share of the plan is invalid.
VALID_SHARE = 0.95
# A request written more than this after its due time was sent late.
LATE_S = 0.1
# Answers that are a deliberate refusal: rate limit (429) or shedding (503).
REFUSED = frozenset({429, 503})
# Business answers of POST /orders: served, but not an order placed.
BUSINESS = frozenset({402, 409})


# ---- the CPU split --------------------------------------------------------------------


def parse_cpus(text: str) -> frozenset[int]:
    """``"0"``, ``"0-1,3"`` -> the CPU numbers; ValueError on anything else."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"not a CPU list: {text!r}")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise ValueError(f"not a CPU list: {text!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError(f"not a CPU list: {text!r}")
    return frozenset(cpus)


def format_cpus(cpus: Iterable[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


@dataclass(frozen=True)
class CpuSplit:
    stack: frozenset[int]
    load: frozenset[int]

    @property
    def pinned(self) -> bool:
        return bool(self.stack) and bool(self.load)

    def describe(self) -> str:
        if not self.pinned:
            return "not pinned (one CPU: stack and generator share it)"
        return f"stack on CPU {format_cpus(self.stack)}, load generator on CPU {format_cpus(self.load)}"


def cpu_split(
    environ: dict[str, str] | None = None, available: Iterable[int] | None = None
) -> CpuSplit:
    """The split from STACK_CPUS / LOAD_CPUS, or half and half of ``available``."""
    env = os.environ if environ is None else environ
    usable = sorted(os.sched_getaffinity(0) if available is None else available)
    stack_text, load_text = env.get("STACK_CPUS", "").strip(), env.get("LOAD_CPUS", "").strip()
    if not stack_text and not load_text:
        if len(usable) < 2:
            return CpuSplit(frozenset(), frozenset())
        half = len(usable) // 2
        return CpuSplit(frozenset(usable[:half]), frozenset(usable[half:]))
    stack = parse_cpus(stack_text) if stack_text else None
    load = parse_cpus(load_text) if load_text else None
    if stack is None:
        stack = frozenset(usable) - (load or frozenset())
    if load is None:
        load = frozenset(usable) - stack
    if stack & load:
        raise ValueError(f"STACK_CPUS and LOAD_CPUS overlap on CPU {format_cpus(stack & load)}")
    missing = (stack | load) - set(usable)
    if missing:
        raise ValueError(f"CPU {format_cpus(missing)} is not available here ({usable})")
    if not stack or not load:
        raise ValueError("STACK_CPUS and LOAD_CPUS must each name at least one CPU")
    return CpuSplit(stack, load)


# ---- pinning ---------------------------------------------------------------------------


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    found = []
    for tid in _threads(pid):
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant alive now."""
    seen, todo = [], [pid]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        todo += _children(current)
    return seen


def cpu_seconds(tops: Iterable[int], only: bytes | None = None) -> float:
    """CPU time (user + system) used so far by ``tops`` and all their descendants, from
    /proc; with ``only``, just the processes whose command line holds it. On a shared
    box the CPU a request costs is steadier than the rate."""
    ticks = 0
    for top in tops:
        for pid in process_tree(top):
            try:
                if only is not None and only not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    continue
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def pin_tree(pid: int, cpus: Iterable[int]) -> int:
    """Pin ``pid``, its threads and all its descendants (and theirs) to ``cpus``;
    returns how many threads were pinned. Processes that exit meanwhile are skipped."""
    target = set(cpus)
    pinned = 0
    for process in process_tree(pid):
        for tid in _threads(process):
            try:
                os.sched_setaffinity(tid, target)
                pinned += 1
            except (ProcessLookupError, PermissionError):
                continue
    return pinned


def tree_affinity(pid: int) -> dict[int, frozenset[int]]:
    """The affinity of every thread of ``pid`` and its descendants, by thread id."""
    found = {}
    for process in process_tree(pid):
        for tid in _threads(process):
            try:
                found[tid] = frozenset(os.sched_getaffinity(tid))
            except ProcessLookupError:
                continue
    return found


def pin_stack(
    pids: Sequence[int], cpus: Iterable[int], front: Sequence[int] = ()
) -> dict[str, Any]:
    """Pin every process tree in ``pids`` (and give it :func:`priority`; those in
    ``front``, nginx, :func:`front_priority`), then read the affinities back."""
    target = frozenset(cpus)
    threads = sum(pin_tree(pid, target) for pid in pids)
    for pid in pids:
        renice(pid, front_priority() if pid in front else priority())
    seen = {tid: aff for pid in pids for tid, aff in tree_affinity(pid).items()}
    stray = sorted(tid for tid, aff in seen.items() if aff != target)
    return {
        "cpus": format_cpus(target),
        "threads": threads,
        "checked": len(seen),
        "stray": stray,
        "nice": priority(),
        "front_nice": front_priority() if front else None,
    }


def priority() -> int:
    """BENCH_NICE: the niceness given to the stack and the generators (default -10
    when this process may raise priority, else 0), so that on a shared box other
    work does not delay their wake-ups; 0 leaves them as they are."""
    default = -10 if os.geteuid() == 0 else 0
    return env_int(os.environ, "BENCH_NICE", default, -20, 19, error=SystemExit)


def front_priority() -> int:
    """BENCH_NGINX_NICE: nginx's niceness (default 5 better than :func:`priority`).
    nginx shares the stack CPU with the app and redis; at 10x capacity it
    refuses ~20,000 requests a second, more CPU than an equal share gives it,
    so refusals waited behind app work (refused p99 54.6 ms in the 00:02 run).
    Ahead of the app, it answers them as they come, and hands the app's answers
    back without delay."""
    base = priority()
    default = max(-20, base - 5) if base < 0 else base
    return env_int(os.environ, "BENCH_NGINX_NICE", default, -20, 19, error=SystemExit)


def load_priority() -> int:
    """BENCH_LOAD_NICE: the generators' niceness (default 10 better than
    :func:`priority`, i.e. -20). At 10x the open-loop generator keeps ~3/4 of its
    CPU busy; at -10 against two of the box's other processes it got at most
    82% of it, and every burst of answers left it writing requests late (lag
    p99 154 ms at 20,000/s, 01:30 on a load average of 3.7), which is then counted
    in every latency. The generators have their CPU to themselves: this costs
    the stack nothing."""
    base = priority()
    default = max(-20, base - 10) if base < 0 else base
    return env_int(os.environ, "BENCH_LOAD_NICE", default, -20, 19, error=SystemExit)


def renice(pid: int, nice: int) -> None:
    """Set the niceness of every thread of ``pid`` and its descendants."""
    if nice == 0:
        return
    for process in process_tree(pid):
        for tid in _threads(process):
            try:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            except (ProcessLookupError, PermissionError):
                continue


def pinned_to(cpus: Iterable[int] | None, nice: int | None = None) -> Any:
    """A ``preexec_fn`` that pins a load generator (and what it forks) to ``cpus``
    and sets its niceness (None: :func:`load_priority`); None when there is
    nothing to do."""
    nice = load_priority() if nice is None else nice
    if not cpus and nice == 0:
        return None
    target = set(cpus or ())

    def pin() -> None:
        if target:
            os.sched_setaffinity(0, target)
        if nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)

    return pin


# ---- the open-loop generator ------------------------------------------------------------


def run_openloop(spec: dict[str, Any], workdir: Path, cpus: Iterable[int] | None) -> dict[str, Any]:
    """Run loadtests/openloop.py with ``spec`` on ``cpus``; its raw result."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = workdir / "openloop-spec.json", workdir / "openloop-result.json"
    spec_path.write_text(json.dumps(spec))
    seconds = sum(p["seconds"] for p in spec["phases"]) + spec.get("timeout_s", 10) + 60
    subprocess.run(
        [sys.executable, "-m", "loadtests.openloop", str(spec_path), str(result_path)],
        cwd=ROOT,
        check=True,
        timeout=seconds,
        preexec_fn=pinned_to(cpus),
    )
    return json.loads(result_path.read_text())


# ---- where the stack CPU went, sampled while a generator runs ----------------------------


def cpu_times(cpus: Iterable[int]) -> dict[str, float]:
    """Seconds ``cpus`` have spent busy (not idle, whoever ran) and, of that, in
    softirq (the kernel's network work: loopback TCP is processed there, outside
    any process's CPU time) since boot (/proc/stat)."""
    wanted = {f"cpu{c}" for c in cpus}
    busy = softirq = 0
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] in wanted:
            ticks = [int(x) for x in fields[1:8]]  # user nice system idle iowait irq softirq
            busy += sum(ticks) - ticks[3] - ticks[4]
            softirq += ticks[6]
    tick = os.sysconf("SC_CLK_TCK")
    return {"cpus_busy": busy / tick, "cpus_softirq": softirq / tick}


def cpu_per_phase(
    samples: Sequence[tuple[float, dict[str, float]]],
    epoch: float,
    phases: Sequence[dict[str, Any]],
    starts: Sequence[float],
) -> list[dict[str, float]]:
    """Per phase, the CPU seconds each counter of ``samples`` (wall time, cumulative
    counters) gained from the phase's start to its end (``epoch`` + the generator's
    phase starts), interpolated between the samples around each end."""

    def at(moment: float) -> dict[str, float]:
        before = [s for s in samples if s[0] <= moment]
        after = [s for s in samples if s[0] >= moment]
        if not before or not after:
            return (before or after)[-1 if before else 0][1]
        (t0, a), (t1, b) = before[-1], after[0]
        share = (moment - t0) / (t1 - t0) if t1 > t0 else 0.0
        return {k: a[k] + (b[k] - a[k]) * share for k in a}

    out = []
    for phase, start in zip(phases, starts, strict=True):
        first, last = at(epoch + start), at(epoch + start + float(phase["seconds"]))
        out.append({k: last[k] - first[k] for k in first})
    return out


# ---- figures per level -------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted ``values`` (nearest rank); 0 for none."""
    if not values:
        return 0.0
    return values[min(len(values) - 1, max(0, int(q * len(values) + 0.999999) - 1))]


def classify(status: int) -> str:
    if 200 <= status < 300:
        return "accepted"
    if status in BUSINESS:
        return "business"
    if status in REFUSED:
        return "refused"
    return "failed"


def phase_figures(result: dict[str, Any], phases: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per phase: planned and offered rate, validity, accepted p50/p99, goodput,
    refused p99, status mix and failures, from the generator's rows.

    A request belongs to the phase it was due in. ``offered_rps`` counts the
    requests of the phase actually written within the phase's window: a
    generator that falls behind writes fewer of them in time.
    """
    starts = result["phase_starts"]
    rows_by_phase: list[list[list[float]]] = [[] for _ in phases]
    for row in result["rows"]:
        rows_by_phase[int(row[0])].append(row)
    figures = []
    for index, phase in enumerate(phases):
        start, seconds = starts[index], float(phase["seconds"])
        end = start + seconds
        rows = rows_by_phase[index]
        planned_total = round(phase["rate"] * seconds)
        sent_in_window = sum(1 for r in rows if start <= r[2] < end)
        offered = sent_in_window / seconds
        mix = Counter(int(r[3]) for r in rows)
        accepted = sorted(r[4] for r in rows if classify(int(r[3])) == "accepted")
        refused = sorted(r[4] for r in rows if classify(int(r[3])) == "refused")
        failures = sum(n for status, n in mix.items() if classify(status) == "failed")
        lags = sorted(r[2] - r[1] for r in rows if not r[5] and r[2] > 0)
        figures.append(
            {
                "phase": phase["name"],
                "planned_rps": float(phase["rate"]),
                "planned": planned_total,
                "answered": len(rows),
                "offered_rps": offered,
                "offered_share": offered / phase["rate"] if phase["rate"] else 0.0,
                "valid": offered >= VALID_SHARE * phase["rate"],
                "goodput_rps": len(accepted) / seconds,
                "accepted_p50_ms": percentile(accepted, 0.50),
                "accepted_p99_ms": percentile(accepted, 0.99),
                "refused": len(refused),
                "refused_p99_ms": percentile(refused, 0.99),
                "failures": failures,
                "statuses": {str(k): v for k, v in sorted(mix.items())},
                # Sent late (or never) because no connection was free or could be opened
                # in time: the stack held them all or did not accept new ones.
                "waited_for_connection": sum(
                    1 for r in rows if r[5] and (r[2] == 0 or r[2] - r[1] > LATE_S)
                ),
                # How late the generator itself wrote requests that had a connection ready.
                "generator_lag_p99_ms": percentile(lags, 0.99) * 1000,
            }
        )
    return figures


def timeline(
    result: dict[str, Any], names: Sequence[str], step: float = 0.5
) -> list[dict[str, Any]]:
    """Per ``step`` seconds of due time: the phase, requests due (and sent, by send
    time), accepted and
    refused answers, failures, accepted p50/p99, for the plot and the recovery."""
    buckets: dict[int, list[list[float]]] = {}
    sent: Counter[int] = Counter()
    for row in result["rows"]:
        buckets.setdefault(int(row[1] / step), []).append(row)
        if row[2] > 0:
            sent[int(row[2] / step)] += 1
    out = []
    for key in sorted(buckets):
        rows = buckets[key]
        accepted = sorted(r[4] for r in rows if classify(int(r[3])) == "accepted")
        refused = sum(1 for r in rows if classify(int(r[3])) == "refused")
        failed = sum(1 for r in rows if classify(int(r[3])) == "failed")
        out.append(
            {
                "t": key * step,
                "phase": names[int(rows[0][0])],
                "due_rps": len(rows) / step,
                "sent_rps": sent[key] / step,
                "accepted_rps": len(accepted) / step,
                "refused_rps": refused / step,
                "failed": failed,
                "p50_ms": percentile(accepted, 0.50),
                "p99_ms": percentile(accepted, 0.99),
            }
        )
    return out


def recovery_seconds(
    windows: Sequence[dict[str, Any]], phase: str, half_p99_ms: float, tolerance: float = 2.0
) -> float | None:
    """Seconds from the start of ``phase`` until every later window (to the phase's
    end) has no refusal, no failure, and an accepted p99 within ``tolerance`` x the
    half-load p99; None when the phase never got there."""
    rows = [w for w in windows if w["phase"] == phase]
    if not rows:
        return None
    good_from = None
    for row in rows:
        good = (
            row["refused_rps"] == 0
            and row["failed"] == 0
            and row["p99_ms"] <= tolerance * max(half_p99_ms, 1.0)
        )
        if good and good_from is None:
            good_from = row["t"]
        elif not good:
            good_from = None
    return None if good_from is None else good_from - rows[0]["t"]
