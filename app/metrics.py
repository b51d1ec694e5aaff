"""The app's Prometheus metrics, summed over every worker of a gunicorn instance.

prometheus-client's multiprocess mode: gunicorn.conf.py points
PROMETHEUS_MULTIPROC_DIR at a folder of its own per instance (emptied when the
instance starts) in the master, before it forks; each worker then keeps its
values in mmap'ed files there, and ``GET /metrics`` (app/admin/metrics.py) adds
them up. A dead worker's counters stay counted; its in-flight gauge is dropped
(``child_exit`` -> ``mark_process_dead``). Without the variable (the in-process
test client, a REPL) the values live in this process's default registry.

prometheus_client picks how it stores values when it is first imported: never
import it (or this module) in a process before PROMETHEUS_MULTIPROC_DIR is set.

Labels come only from bounded sets: route templates
(``request.match_info.route.resource.canonical``, never the raw path), HTTP
methods and statuses, problem codes, script and Redis command names.

Per-request updates are batched: the hot path adds to plain Python numbers, and
the sums are written to prometheus_client's values (a lock and an mmap write
each) once at the end of the event-loop turn, for every request that turn
finished. A scrape writes its own worker's pending sums first.
``set_batching(False)`` (OBSERVE_BATCHING=0) writes every update at once, as
before, for A/B runs.
"""

from __future__ import annotations

import asyncio
import bisect
import os
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Multiprocess values call os.getpid() on every update to notice a fork; a
# getpid is a syscall (about 2 us on sandboxed boxes like ours, several per
# request). The pid is cached instead and refreshed in a forked child.
_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


def _cached_pid() -> int:
    return _pid


if os.environ.get(MULTIPROC_ENV):
    os.register_at_fork(after_in_child=_refresh_pid)
    values.ValueClass = values.MultiProcessValue(process_identifier=_cached_pid)

_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5)

HTTP_REQUESTS = Counter(
    "phoneshop_http_requests_total",
    "HTTP requests answered by the app, by method, route template and status",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "phoneshop_http_request_duration_seconds",
    "Time from routing to the handler's answer, by method, route template and status",
    ["method", "route", "status"],
    buckets=_HTTP_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge(
    "phoneshop_http_requests_in_flight",
    "Requests being served now, as the MAX_INFLIGHT cap counts them (health probes "
    "and open event sockets excluded), summed over live workers",
    multiprocess_mode="livesum",
)
# The known values of each labelled counter. Every one is created (at 0) when
# this module is imported, so its series exists before the first increment and
# rate() and absence-based alerts work from a worker's start. A new shedding
# reason or rejection code is added here, and only here.
SHED_REASONS = ("overloaded", "queued_too_long", "service_unavailable")
# The problem codes app/lua/place_order.lua refuses an order with (its header).
ORDER_REJECT_REASONS = (
    "out_of_stock",
    "insufficient_funds",
    "phone_not_found",
    "customer_not_found",
    "idempotency_key_reused",
    # A short pool whose phone lends units to stripes (docs/escrow.md 5): the app recalls
    # them and tries once more, so most of these end as an order or an out_of_stock.
    "stock_lent",
)

HTTP_SHED = Counter(
    "phoneshop_http_shed_total",
    "Requests the app answered 503 itself: overloaded (past the adaptive in-flight "
    "limit), queued_too_long (waited in front of the worker past the queue target) or "
    "service_unavailable (Redis unreachable, timing out or busy). nginx's own 429s "
    "and 503s are in nginx's access log, not here.",
    ["reason"],
)
OVERLOAD_LIMIT = Gauge(
    "phoneshop_overload_limit",
    "The adaptive in-flight limit (app/overload.py), summed over live workers",
    multiprocess_mode="livesum",
)
REQUEST_QUEUE = Histogram(
    "phoneshop_request_queue_seconds",
    "Time from nginx's X-Request-Start stamp to the worker picking the request up",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
ORDERS_PLACED = Counter("phoneshop_orders_placed_total", "Orders placed (replays not counted)")
ORDERS_COMPLETED = Counter(
    "phoneshop_orders_completed_total", "Orders completed, at placing (autocheck) or by a check"
)
ORDERS_CANCELLED = Counter("phoneshop_orders_cancelled_total", "Open orders cancelled")
ORDERS_REJECTED = Counter(
    "phoneshop_orders_rejected_total",
    "Orders the place_order script refused, by problem code ("
    + ", ".join(ORDER_REJECT_REASONS)
    + ")",
    ["reason"],
)
IDEMPOTENT_REPLAYS = Counter(
    "phoneshop_idempotent_replays_total",
    "POST /orders answered from a stored Idempotency-Key answer (accepted or refused)",
)
REDIS_DURATION = Histogram(
    "phoneshop_redis_call_duration_seconds",
    "Redis round trips of the app: script:<name> (one Lua script), a command name, or PIPELINE",
    ["call"],
    buckets=_REDIS_BUCKETS,
)


class _Batch:
    """The updates made during this event-loop turn, written out at its end."""

    def __init__(self) -> None:
        self.enabled = True
        self.dirty: list[Any] = []
        self.scheduled = False

    def mark(self, updates: Any) -> None:
        if not updates.dirty:
            updates.dirty = True
            self.dirty.append(updates)
        if self.scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a script, a sync test): write now
            self.flush()
            return
        self.scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        pending, self.dirty = self.dirty, []
        for updates in pending:
            updates.dirty = False
            updates.write()


_BATCH = _Batch()


def set_batching(enabled: bool) -> None:
    """Batch updates per event-loop turn (the default), or write each one at once."""
    flush()
    _BATCH.enabled = enabled


def flush() -> None:
    """Write this process's pending updates now (before a scrape, at shutdown)."""
    _BATCH.flush()


class CounterUpdates:
    """``inc`` on a counter child, summed until the end of the loop turn."""

    __slots__ = ("amount", "child", "dirty")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.amount = 0.0
        self.dirty = False

    def inc(self, amount: float = 1.0) -> None:
        if not _BATCH.enabled:
            self.child.inc(amount)
            return
        self.amount += amount
        _BATCH.mark(self)

    def write(self) -> None:
        amount, self.amount = self.amount, 0.0
        if amount:
            self.child.inc(amount)


class HistogramUpdates:
    """``observe`` on a histogram child: bucket counts and the sum kept here until
    the end of the loop turn, then added to the child's own values, exactly as
    that many ``observe`` calls would (each value counts in the first bucket whose
    upper bound is not below it)."""

    __slots__ = ("bounds", "child", "counts", "dirty", "total")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds: list[float] = list(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.dirty = False

    def observe(self, amount: float) -> None:
        if not _BATCH.enabled:
            self.child.observe(amount)
            return
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.total += amount
        _BATCH.mark(self)

    def write(self) -> None:
        counts, total = self.counts, self.total
        self.counts, self.total = [0] * len(self.bounds), 0.0
        self.child._sum.inc(total)
        for bucket, count in zip(self.child._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


class GaugeValue:
    """``set`` on a gauge: the last value of the loop turn is written at its end."""

    __slots__ = ("child", "dirty", "value")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.value = 0.0
        self.dirty = False

    def set(self, value: float) -> None:
        if not _BATCH.enabled:
            self.child.set(value)
            return
        self.value = value
        _BATCH.mark(self)

    def write(self) -> None:
        self.child.set(self.value)


class Children:
    """``metric.labels(*values)``, cached and wrapped in its batched updates: the hot
    path skips prometheus_client's label validation and lock after the first call
    per label set."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._wrap = HistogramUpdates if isinstance(metric, Histogram) else CounterUpdates
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._wrap(self._metric.labels(*values))
        return child


http_requests = Children(HTTP_REQUESTS)
http_duration = Children(HTTP_DURATION)
http_shed = Children(HTTP_SHED)
orders_rejected = Children(ORDERS_REJECTED)
redis_duration = Children(REDIS_DURATION)
orders_placed = CounterUpdates(ORDERS_PLACED)
orders_completed = CounterUpdates(ORDERS_COMPLETED)
orders_cancelled = CounterUpdates(ORDERS_CANCELLED)
idempotent_replays = CounterUpdates(IDEMPOTENT_REPLAYS)
request_queue = HistogramUpdates(REQUEST_QUEUE)
# Set by each worker's overload control (app/overload.py); livesum adds the workers up.
http_in_flight = GaugeValue(HTTP_IN_FLIGHT)
overload_limit = GaugeValue(OVERLOAD_LIMIT)

for _reason in SHED_REASONS:
    http_shed(_reason)
for _reason in ORDER_REJECT_REASONS:
    orders_rejected(_reason)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


async def scrape(accept: str | None) -> tuple[bytes, str]:
    """The text to answer a scrape with, and its content type.

    This worker's pending updates are written first, on the loop's thread (the
    batch is the loop's alone: a flush in another thread could race a turn's and
    lose a mark); reading every worker's files is blocking I/O, so it runs in
    the default executor.
    """
    flush()
    return await asyncio.get_running_loop().run_in_executor(None, _exposition, accept)


def _exposition(accept: str | None) -> tuple[bytes, str]:
    # In multiprocess mode a fresh registry reads every worker's files (the
    # prometheus-client way: nothing registers into it by accident).
    if multiprocess_dir() is not None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
