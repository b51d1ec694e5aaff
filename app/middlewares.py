"""The request-id, error and in-flight-cap middlewares.

Order (outermost first): request id, so every answer carries one; errors, so
every failure below becomes problem+json; then the in-flight cap.
"""

from __future__ import annotations

import logging
import re
import uuid

import redis.exceptions
from aiohttp import web
from aiohttp.typedefs import Handler

from app import appkeys
from app.auth import bearer_sent, challenge
from app.metrics import HTTP_IN_FLIGHT
from app.problems import PROBLEMS, ProblemError, problem_response, retry_later

log = logging.getLogger(__name__)

REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")

# Liveness, readiness and the metrics must answer even when the worker is saturated.
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

_HTTP_CODES = {
    400: "malformed_json",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Take nginx's X-Request-ID (or make one) and hand it back to the client."""
    given = request.headers.get("X-Request-ID", "")
    trusted = request.app[appkeys.SETTINGS].behind_proxy and _REQUEST_ID.fullmatch(given)
    request_id = given if trusted else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    response = await handler(request)
    response.headers["X-Request-ID"] = request_id
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every domain error, HTTP error and outage to RFC 9457 problem+json."""
    try:
        return await handler(request)
    except ProblemError as error:
        if error.status == 401:
            error.headers.setdefault("WWW-Authenticate", challenge(bearer_sent(request)))
        return problem_response(error)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = _HTTP_CODES.get(error.status)
        if code is None:
            problem = ProblemError("internal_error", error.reason)
            problem.status, problem.title, problem.code = error.status, error.reason, "http_error"
        else:
            problem = ProblemError(code, PROBLEMS[code][1])
        if error.status == 405:
            problem.headers["Allow"] = error.headers.get("Allow", "")
        if error.status == 401:
            problem.headers["WWW-Authenticate"] = challenge(bearer_sent(request))
        return problem_response(problem)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
        log.warning("redis unavailable: %s", error.__class__.__name__)
        if isinstance(error, redis.exceptions.ConnectionError):
            # One dead connection means Redis went away: its idle siblings are
            # dead too. Drop them now, so the first requests after Redis comes
            # back reconnect instead of each failing on a stale socket.
            await request.app[appkeys.REDIS].connection_pool.disconnect(inuse_connections=False)
        return problem_response(
            retry_later("service_unavailable", 1, "The data store is unavailable")
        )
    except redis.exceptions.ResponseError as error:
        if "BUSY" in str(error) or "LOADING" in str(error) or "READONLY" in str(error):
            return problem_response(retry_later("service_unavailable", 1, "The data store is busy"))
        log.exception("redis error on %s %s", request.method, request.path)
        return problem_response(ProblemError("internal_error"))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem_response(ProblemError("internal_error"))


class InflightGauge:
    """Requests this worker is serving now, against its cap; every change also
    moves the phoneshop_http_requests_in_flight gauge (app/metrics.py)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._current = 0

    @property
    def current(self) -> int:
        return self._current

    @current.setter
    def current(self, value: int) -> None:
        HTTP_IN_FLIGHT.inc(value - self._current)
        self._current = value


@web.middleware
async def inflight_cap_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Past MAX_INFLIGHT concurrent requests, answer 503 at once rather than
    queueing work in the event loop until every request times out."""
    if request.path in EXEMPT_PATHS:
        return await handler(request)
    gauge = request.app[appkeys.INFLIGHT]
    if gauge.current >= gauge.limit:
        raise retry_later("overloaded", 1)
    gauge.current += 1
    try:
        return await handler(request)
    finally:
        gauge.current -= 1
