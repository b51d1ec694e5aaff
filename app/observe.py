"""What the app tells its operators: metrics (app/metrics.py) and the JSON access log.

* ``record`` (called by the one middleware, app/middlewares.py, after the
  error mapping, so it sees every answer the app made, 503s included): counts
  and times each request by method, route template and status, counts the
  app's own 503s by reason, and writes one JSON access line per request
  (logger ``phoneshop.access``; gunicorn's access log is off). The middleware
  also puts the request id into :data:`app.logs.request_id_var`, so every log
  line written while the request is handled carries it. Requests the overload
  control refuses (app/overload.py) are only counted, never timed or logged.
* Both are batched per event-loop turn (app/metrics.py, app/logs.py
  AccessLogHandler): the hot path adds numbers and formats a line, and one
  write per turn carries them all.
* ``instrument`` (an on_startup hook, after redis_ctx made the clients):
  wraps the Scripts holder in :class:`ObservedScripts`, which counts order
  outcomes from the script's own answer. Redis calls are timed where they are
  made, in app/redis_gateway.py.

Durations are measured from routing to the handler's answer, before the body
is written to the socket; nginx's ``request_time`` covers the whole exchange.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from aiohttp import web

from app import appkeys, logs, metrics
from app.logs import ACCESS_LOGGER
from app.problems import PROBLEM_CODE, ProblemError
from app.scripts import problem_from_script
from app.vocabulary import COMPLETED

access_log = logging.getLogger(ACCESS_LOGGER)
_direct_access_log = logs.DirectAccessLog(access_log)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Problem codes of the 503s the app answers itself (app/problems.py).
SHED_CODES = frozenset(metrics.SHED_REASONS)
# The client closed the connection before the answer (nginx's convention).
CLIENT_CLOSED = 499


def route_of(request: web.Request) -> str:
    """The matched route's template (``/orders/{id}``), or ``unmatched`` for a
    404/405 that no route took: never the raw path, which clients choose."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def client_address(request: web.Request) -> str:
    """The client's address: with BEHIND_PROXY the X-Forwarded-For that nginx
    sets (one address, nginx's ``$remote_addr``: it overwrites whatever the
    client sent), else the TCP peer."""
    if request.app[appkeys.SETTINGS].behind_proxy:
        forwarded = request.headers.get("X-Forwarded-For", "").strip()
        if forwarded:
            return forwarded
    return request.remote or ""


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # a chain, a name, garbage: not provably local
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def record(
    request: web.Request, response: web.StreamResponse | None, status: int, elapsed: float
) -> None:
    """Count, time and log one answered request (app/middlewares.py calls it
    last, after the error mapping, so it sees every answer the app made)."""
    method = request.method if request.method in _METHODS else "OTHER"
    route = route_of(request)
    status_label = str(status)
    metrics.http_requests(method, route, status_label).inc()
    metrics.http_duration(method, route, status_label).observe(elapsed)
    problem = response.get(PROBLEM_CODE) if response is not None else None
    if problem in SHED_CODES:
        metrics.http_shed(problem).inc()
    if access_log.isEnabledFor(logging.INFO):
        _log_access(request, response, method, route, status, elapsed, problem)


def _log_access(
    request: web.Request,
    response: web.StreamResponse | None,
    method: str,
    route: str,
    status: int,
    elapsed: float,
    problem: str | None,
) -> None:
    # The path without its query string: no query parameter is ever logged.
    fields: dict[str, Any] = {
        "method": method,
        "route": route,
        "path": request.path,
        "status": status,
        "duration_ms": round(elapsed * 1000, 3),
        "remote": client_address(request),
    }
    if response is not None:
        if response.content_length is not None:
            fields["bytes"] = response.content_length
        if response.headers.get("Idempotent-Replayed") == "true":
            fields["replayed"] = True
    if problem is not None:
        fields["problem"] = problem
    if not _direct_access_log.write(f"{method} {request.path} {status}", fields):
        access_log.info("%s %s %d", method, request.path, status, extra=fields)


# ---- Redis and order outcomes ------------------------------------------------------


# The scripts whose answer is a POST /orders answer: place_order (the saga collapsed
# into one script on one node), or the split saga's commit or the rejection that ends
# the order.
_ORDER_ANSWERS = frozenset({"place_order", "commit_order", "reject_order"})
# The scripts that cancel an order: cancel_order, or the saga's refund step.
_CANCELS = frozenset({"cancel_order", "refund_order"})


def _count_order_answer(result: Any) -> None:
    # Third reply element of an order answer: "replayed" (a stored answer, 2xx or not).
    if result.flag:
        metrics.idempotent_replays.inc()
    elif result.status >= 400:
        metrics.orders_rejected(problem_from_script(result.status, result.payload).code).inc()
    else:
        metrics.orders_placed.inc()
        if result.payload.get("status") == COMPLETED:
            metrics.orders_completed.inc()


class ObservedScripts:
    """The Scripts holder with the order outcomes read off the script's answer:
    placed / completed / cancelled, rejections by problem code, idempotent
    replays, by either order path. Everything else is the holder's own (the gateway
    times the call)."""

    def __init__(self, scripts: Any) -> None:
        self._scripts = scripts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scripts, name)

    @property
    def gateway(self) -> Any:
        """The holder's gateway, asked for by every order's answer: a property, not
        __getattr__'s way round a failed lookup (P1)."""
        return self._scripts.gateway

    async def call(
        self, name: str, keys: list[str], args: list[str | bytes | int], *, one_node: bool = False
    ) -> Any:
        """The saga's steps take answers as they are (refusals included)."""
        result = await self._scripts.call(name, keys, args, one_node=one_node)
        if name in _ORDER_ANSWERS:
            _count_order_answer(result)
        return result

    async def run(
        self, name: str, keys: list[str], args: list[str | bytes | int], *, one_node: bool = False
    ) -> Any:
        try:
            result = await self._scripts.run(name, keys, args, one_node=one_node)
        except ProblemError as error:  # the script refused: nothing was written
            if name in _ORDER_ANSWERS:
                metrics.orders_rejected(error.code).inc()
            raise
        # Third reply element: an order answer's "replayed", check/cancel's "changed".
        if name in _ORDER_ANSWERS:
            _count_order_answer(result)
        elif name == "check_order" and result.flag:
            metrics.orders_completed.inc()
        elif name in _CANCELS and result.flag:
            metrics.orders_cancelled.inc()
        return result


async def instrument(app: web.Application) -> None:
    """on_startup, after redis_ctx: count order outcomes, and batch the
    metric updates and access lines per loop turn unless OBSERVE_BATCHING=0."""
    batching = app[appkeys.SETTINGS].observe_batching
    metrics.set_batching(batching)
    logs.set_batching(batching)
    app[appkeys.SCRIPTS] = ObservedScripts(app[appkeys.SCRIPTS])  # type: ignore[assignment]


async def flush_observations(app: web.Application) -> None:
    """on_cleanup: write what the last loop turn left pending."""
    metrics.flush()
    for handler in access_log.handlers:
        handler.flush()
