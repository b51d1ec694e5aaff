"""Overload control for one worker: refuse at once what cannot be served quickly.

Every non-probe request passes three checks before any work is done on it
(app/middlewares.py runs them first):

1. **Queue time (CoDel).** nginx stamps ``X-Request-Start: t=<unix seconds>``
   when it sends the request on; the wait until this worker picks it up is
   time spent in socket buffers and behind other requests in the event loop.
   As in CoDel, a burst is told from a standing queue by time: only once
   every wait has stayed above the target for a whole interval is the worker
   "dropping", and then a request that waited longer than the target is
   refused (completing or cancelling an order may wait the whole interval).
   The first wait under the target ends it. A request that waited ten
   intervals is refused in any state. The target is not a constant: it
   is the no-load latency of the current traffic mix times the latency
   tolerance, with a floor: a request that waited in line longer than the
   service latency we accept would be answered too late to be worth the work.
2. **An adaptive concurrency limit** (the gradient of Netflix's
   concurrency-limits and Envoy's adaptive concurrency filter). Every window
   the time the finished requests took is compared with the time their
   routes' baselines expected: past the tolerance the limit shrinks in
   proportion (at most by half), within it the limit grows by sqrt(limit).
   A route's baseline is its mean latency, learned only from healthy windows
   (nothing refused, latency within the tolerance), so an overload or a
   sudden slowdown of Redis never teaches the worker that slow is normal.
   The limit starts at MAX_INFLIGHT, so a burst on an idle worker is served,
   and stays between OVERLOAD_MIN_LIMIT and MAX_INFLIGHT.
3. **Priorities**, as the share of the limit each class may fill:
   probes are never refused; completing or cancelling an existing order may
   fill the whole limit and may wait the whole interval; catalogue and other
   reads 90%; new orders and every other write 80%. See README "Overload".

Refusals are 503 problem+json with a Retry-After computed from the state:
the seconds of current throughput that the recently refused demand would need,
plus the current queue delay.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from enum import IntEnum

from app import metrics
from app.settings import Settings

# Exempt from every check, and never counted: an overloaded worker must still
# answer its probes and its scrape.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Finished when the socket closes, hours later: no latency sample.
UNSAMPLED_ROUTES = frozenset({"/orders/events"})
# Routes that finish work already accepted: completing or cancelling an order.
FINISH_ROUTES = frozenset(
    {"/orders/{id}/check", "/orders/check/{id}", "/phones/check/{id}", "/orders/{id}/cancel"}
)

# Fewer samples than this in a window say nothing about latency: keep the limit.
_MIN_SAMPLES = 5
# The gradient never cuts the limit by more than half in one window.
_MIN_GRADIENT = 0.5
# A route's baseline is the mean of its window means over about this many
# seconds, learned only from healthy windows: nothing refused and latency
# within the tolerance. A dependency that got a little slower for good
# becomes the new normal; a sudden slowdown never does.
_BASELINE_SECONDS = 10.0
# The longest wait any request may have had, in intervals.
_MAX_WAIT_INTERVALS = 10
# Weight of the newest window in the rate estimates behind Retry-After.
_RATE_WEIGHT = 0.3


class Priority(IntEnum):
    PROBE = 0
    FINISH = 1
    READ = 2
    NEW = 3


# The share of the limit kept free for the classes above: reads may fill 90%
# of it, new work 80%, completing or cancelling an order all of it.
_RESERVE = {Priority.FINISH: 0.0, Priority.READ: 0.1, Priority.NEW: 0.2}

REFUSED_LIMIT = "overloaded"
REFUSED_QUEUE = "queued_too_long"


def priority_of(method: str, path: str, route: str) -> Priority:
    if path in PROBE_PATHS:
        return Priority.PROBE
    if route in FINISH_ROUTES:
        return Priority.FINISH
    if method in ("GET", "HEAD"):
        return Priority.READ
    return Priority.NEW


def queue_delay(header: str | None, now: float) -> float:
    """Seconds since nginx stamped the request (``t=1733097600.123``); 0 when
    the header is absent or not a sane stamp."""
    if not header or not header.startswith("t="):
        return 0.0
    try:
        stamped = float(header[2:])
    except ValueError:
        return 0.0
    waited = now - stamped
    # A stamp from the future, or older than a minute, is not nginx's.
    return waited if 0.0 < waited < 60.0 else 0.0


class OverloadControl:
    """One worker's limit, in-flight count, queue state and the numbers behind them."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.adaptive = settings.overload_adaptive
        self.max_limit = settings.max_inflight
        self.min_limit = min(settings.overload_min_limit, settings.max_inflight)
        self.tolerance = settings.overload_latency_tolerance
        self.window = settings.overload_window_ms / 1000
        self.target_floor = settings.overload_queue_target_min_ms / 1000
        self.interval = settings.overload_queue_interval_ms / 1000
        # Past this wait a request is refused in any state: its client has
        # waited so long that serving a stale backlog only delays fresh work.
        self.max_wait = _MAX_WAIT_INTERVALS * self.interval
        self._clock = clock
        self._current = 0
        self.limit = float(self.max_limit)
        self._caps = self._caps_for(self.limit)
        # Route template -> its no-load latency, seconds.
        self._baseline: dict[str, float] = {}
        # The no-load latency of the traffic mix (the baselines of what was served).
        self.mix_baseline = 0.0
        self.target = self.target_floor
        # The current window.
        now = clock()
        self._window_end = now + self.window
        # This window: time the answers took and the time their baselines
        # expected, and per route [sum of latencies, count].
        self._spent = 0.0
        self._expected = 0.0
        self._sums: dict[str, list[float]] = {}
        self._refused = 0
        self._served = 0
        # CoDel: when waits above the target will have lasted an interval
        # (0: the last wait was under it), and whether that happened.
        self._above_until = 0.0
        self._last_arrival = 0.0
        self.dropping = False
        self.last_wait = 0.0
        # Rates per second (moving averages over windows) and the answer they give.
        self.refused_rate = 0.0
        self.served_rate = 0.0
        self.retry_after = "1"
        metrics.overload_limit.set(self.limit)

    @staticmethod
    def _caps_for(limit: float) -> dict[Priority, int]:
        # The slots kept free for the classes above: whole ones only, so a
        # tiny limit is not cut to nothing.
        whole = int(limit)
        return {p: max(1, whole - int(limit * reserve)) for p, reserve in _RESERVE.items()}

    # The in-flight count; app/events/handlers.py gives an upgraded socket's slot back.
    @property
    def current(self) -> int:
        return self._current

    @current.setter
    def current(self, value: int) -> None:
        self._current = value
        metrics.http_in_flight.set(value)

    def admit(self, priority: Priority, waited: float) -> str | None:
        """Take the request (counted in flight) or say why not: a refusal code."""
        now = self._clock()
        if now >= self._window_end:  # also when nothing finishes (a hung Redis)
            self._end_window(now)
        if self.adaptive and waited > 0.0:
            # A wait under the target, or a pause in arrivals longer than the
            # interval, means the queue emptied: what stood before is gone.
            idle = now - self._last_arrival > self.interval
            self._last_arrival = now
            self.last_wait = waited
            if waited <= self.target or idle:
                self._above_until = 0.0
                self.dropping = False
            elif not self._above_until:
                self._above_until = now + self.interval
            elif now >= self._above_until:
                self.dropping = True
            if self.dropping:
                allowed = self.interval if priority == Priority.FINISH else self.target
            else:
                allowed = self.max_wait
            if waited > allowed:
                self._refused += 1
                return REFUSED_QUEUE
        if self._current >= self._caps[priority]:
            self._refused += 1
            return REFUSED_LIMIT
        self.current = self._current + 1
        return None

    def done(self, route: str, elapsed: float) -> None:
        """A request admitted by :meth:`admit` finished after ``elapsed`` seconds."""
        self.current = self._current - 1
        self._served += 1
        if self.adaptive and route not in UNSAMPLED_ROUTES:
            baseline = self._baseline.get(route)
            if baseline is None:  # a route's first answer is its first baseline
                baseline = self._baseline[route] = elapsed or 1e-6
            self._spent += elapsed
            self._expected += baseline
            sums = self._sums.get(route)
            if sums is None:
                self._sums[route] = [elapsed, 1]
            else:
                sums[0] += elapsed
                sums[1] += 1
        now = self._clock()
        if now >= self._window_end:
            self._end_window(now)

    def _end_window(self, now: float) -> None:
        elapsed = self.window + (now - self._window_end)
        if self.adaptive:
            self._adapt(elapsed)
        self.refused_rate += _RATE_WEIGHT * (self._refused / elapsed - self.refused_rate)
        self.served_rate += _RATE_WEIGHT * (self._served / elapsed - self.served_rate)
        self.retry_after = str(self._retry_after())
        self._spent = self._expected = 0.0
        self._sums = {}
        self._refused = self._served = 0
        self._window_end = now + self.window

    def _adapt(self, elapsed: float) -> None:
        samples = sum(count for _, count in self._sums.values())
        if samples >= _MIN_SAMPLES:
            # How much longer than their baselines this window's answers took.
            slowdown = self._spent / self._expected
            gradient = max(_MIN_GRADIENT, min(1.0, self.tolerance / slowdown))
            steps = 1
            if slowdown <= self.tolerance and not self._refused:
                self._learn_baselines(elapsed)
        else:
            # Too few samples say nothing about latency. An idle worker's limit
            # grows back, a step for every window it was idle; one whose
            # requests are stuck in flight (a hung Redis) keeps its limit.
            gradient = 1.0
            steps = 0 if self._current >= self.limit / 2 else int(elapsed / self.window)
        limit = self.limit * gradient
        for _ in range(min(max(steps, 0), 64)):
            if limit >= self.max_limit:
                break
            limit += math.sqrt(limit)
        self.limit = min(max(limit, self.min_limit), self.max_limit)
        self._caps = self._caps_for(self.limit)
        metrics.overload_limit.set(self.limit)
        self.target = min(max(self.tolerance * self.mix_baseline, self.target_floor), self.interval)

    def _learn_baselines(self, elapsed: float) -> None:
        weight = min(elapsed / _BASELINE_SECONDS, 1.0)
        served = weighted = 0.0
        for route, (total, count) in self._sums.items():
            baseline = self._baseline[route]
            baseline += weight * (total / count - baseline)
            self._baseline[route] = baseline
            served += count
            weighted += count * baseline
        mix = weighted / served
        self.mix_baseline += (mix - self.mix_baseline) * (weight if self.mix_baseline else 1.0)

    def _retry_after(self) -> int:
        # Seconds of the current throughput the refused demand would need, plus
        # the wait already standing in front of the worker. At 3x capacity
        # about 2 s, at 10x about 9 s: the retries spread over the time the
        # shop needs to serve them instead of arriving together.
        backlog = self.refused_rate / max(self.served_rate, 1.0)
        wait = self.last_wait if self.dropping else 0.0
        return min(max(math.ceil(backlog + wait), 1), 60)
