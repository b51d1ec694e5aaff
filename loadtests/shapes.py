"""Load shapes for loadtests/locustfile.py, chosen with ``PHONESHOP_SHAPE``.

``step``: a step ramp that finds the knee. ``--steps`` steps of
``--step-users`` more users each, ``--step-seconds`` long. Each user aims at
``--user-rate`` tasks per second, so step ``i`` offers about
``i * step_users * user_rate`` requests per second; the knee is the step where
the achieved rate stops following the offered one (loadtests/bench.py reads
it from the per-phase figures the locustfile records).

``overflow``: drives offered load to ``--overload-factor`` (at least 3) times
``--capacity-rps`` (the measured capacity), holds it, then drops back to half
the capacity to show recovery: phases ``half`` -> ``overload`` -> ``recovery``.

Both are finite: ``tick`` returns None after the last phase and Locust stops.

The plans here import nothing from Locust (importing locust monkey-patches the
whole process with gevent, which the test suite must not get); ``pick`` builds
the LoadTestShape subclass the locustfile binds.
"""

from __future__ import annotations

import math
import time
from typing import Any


def add_options(group: Any) -> None:
    group.add_argument("--step-users", type=int, default=20, help="step: users added per step")
    group.add_argument("--step-seconds", type=float, default=10.0, help="step: seconds per step")
    group.add_argument("--steps", type=int, default=6, help="step: number of steps")
    group.add_argument(
        "--capacity-rps",
        type=float,
        default=500.0,
        help="overflow: the measured capacity (requests/s) the factors apply to",
    )
    group.add_argument("--overload-factor", type=float, default=3.0)
    group.add_argument("--half-seconds", type=float, default=20.0)
    group.add_argument("--overload-seconds", type=float, default=30.0)
    group.add_argument("--recovery-seconds", type=float, default=30.0)


class PhasedShape:
    """A list of (name, users, seconds) phases, run in order.

    The clock and ``runner`` mirror locust.LoadTestShape's, which this is
    combined with in ``pick``.
    """

    current_phase = "setup"
    runner: Any = None

    def __init__(self) -> None:
        self.start_time = time.perf_counter()

    def reset_time(self) -> None:
        self.start_time = time.perf_counter()

    def get_run_time(self) -> float:
        return time.perf_counter() - self.start_time

    def phases(self) -> list[tuple[str, int, float]]:
        raise NotImplementedError

    def _options(self) -> Any:
        return self.runner.environment.parsed_options

    def plan(self) -> list[dict[str, Any]]:
        """The phases with their start and end times, for the report."""
        start, out = 0.0, []
        for name, users, seconds in self.phases():
            out.append({"phase": name, "users": users, "start": start, "end": start + seconds})
            start += seconds
        return out

    def tick(self) -> tuple[int, float] | None:
        elapsed = self.get_run_time()
        previous_users = 1
        for name, users, seconds in self.phases():
            if elapsed < seconds:
                self.current_phase = name
                # Fast steps: the whole change within about half a second.
                return users, max(10.0, abs(users - previous_users) * 2.0)
            elapsed -= seconds
            previous_users = users
        self.current_phase = "done"
        return None


def users_for(rps: float, user_rate: float) -> int:
    return max(1, math.ceil(rps / user_rate))


class StepRamp(PhasedShape):
    def phases(self) -> list[tuple[str, int, float]]:
        o = self._options()
        return [(f"step-{i}", i * o.step_users, o.step_seconds) for i in range(1, o.steps + 1)]


class Overflow(PhasedShape):
    def phases(self) -> list[tuple[str, int, float]]:
        o = self._options()
        factor = max(3.0, o.overload_factor)
        half = users_for(o.capacity_rps * 0.5, o.user_rate)
        over = users_for(o.capacity_rps * factor, o.user_rate)
        return [
            ("half", half, o.half_seconds),
            ("overload", over, o.overload_seconds),
            ("recovery", half, o.recovery_seconds),
        ]


SHAPES: dict[str, type[PhasedShape]] = {"step": StepRamp, "overflow": Overflow}


def pick(name: str) -> type:
    """The Locust shape class for ``name``: the plan combined with LoadTestShape."""
    from locust import LoadTestShape

    if name not in SHAPES:
        raise SystemExit(f"PHONESHOP_SHAPE must be one of {', '.join(SHAPES)}, got {name!r}")
    plan = SHAPES[name]
    meta = type(LoadTestShape)
    return meta(plan.__name__, (plan, LoadTestShape), {"__module__": __name__, "abstract": False})
