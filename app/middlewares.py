"""The app's one middleware: overload control, request id, errors, observation.

It used to be four nested middlewares (request id, observe, errors, in-flight
cap): four coroutine frames and a partial per request on the order hot path,
and the in-flight cap last, so a request the worker was going to refuse got a
request id, a timer and an access line first. Now, in this order:

1. overload control (app/overload.py): probes pass; anything else is admitted
   or refused with a 503 before any work is done on it;
2. the request id: nginx's X-Request-ID (or a fresh one), handed back;
3. the handler, with every domain error, HTTP error and outage mapped to
   RFC 9457 problem+json;
4. the metrics and the access line (app/observe.py), which see every answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import redis.exceptions
from aiohttp import web
from aiohttp.typedefs import Handler

from app import appkeys, metrics
from app.auth import bearer_sent, challenge
from app.logs import request_id_var
from app.observe import CLIENT_CLOSED, record, route_of
from app.overload import PROBE_PATHS, priority_of, queue_delay
from app.problems import (
    PROBLEM_CODE,
    PROBLEM_CONTENT_TYPE,
    PROBLEMS,
    ProblemError,
    problem_body,
    problem_response,
    retry_later,
)
from app.redis_gateway import WriteUnconfirmed
from app.scripts import unconfirmed_problem
from app.vocabulary import is_request_id

log = logging.getLogger(__name__)

REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id")

_HTTP_CODES = {
    400: "malformed_json",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def _refusal_body(code: str) -> bytes:
    status, title = PROBLEMS[code]
    return problem_body(code, status, title, title, {})


# Refusals are built from bytes made once: a refusal must cost microseconds.
_REFUSALS = {code: _refusal_body(code) for code in ("overloaded", "queued_too_long")}


def _refusal(code: str, retry_after: str, request_id: str) -> web.Response:
    response = web.Response(
        status=503,
        body=_REFUSALS[code],
        content_type=PROBLEM_CONTENT_TYPE,
        headers={"Retry-After": retry_after, "X-Request-ID": request_id},
    )
    response[PROBLEM_CODE] = code
    return response


def _request_id(request: web.Request, behind_proxy: bool) -> str:
    given = request.headers.get("X-Request-ID", "")
    return given if behind_proxy and is_request_id(given) else uuid.uuid4().hex


@web.middleware
async def front_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    app = request.app
    behind_proxy = app[appkeys.SETTINGS].behind_proxy
    control = None
    route = ""
    if request.path not in PROBE_PATHS:
        control = app[appkeys.INFLIGHT]
        route = route_of(request)
        waited = 0.0
        if behind_proxy:
            waited = queue_delay(request.headers.get("X-Request-Start"), time.time())
            if waited:
                metrics.request_queue.observe(waited)
        refused = control.admit(priority_of(request.method, request.path, route), waited)
        if refused is not None:
            metrics.http_shed(refused).inc()
            return _refusal(refused, control.retry_after, _request_id(request, behind_proxy))
    request_id = request[REQUEST_ID] = _request_id(request, behind_proxy)
    token = request_id_var.set(request_id)
    started = time.perf_counter()
    status = 500
    response: web.StreamResponse | None = None
    try:
        try:
            response = await handler(request)
        except ProblemError as error:
            if error.status == 401:
                error.headers.setdefault("WWW-Authenticate", challenge(bearer_sent(request)))
            response = problem_response(error)
        except web.HTTPException as error:
            if error.status < 400:
                raise
            response = _http_problem(request, error)
        except WriteUnconfirmed as error:
            # A step that runs its script with Scripts.call (the saga's reserve and
            # commit) gets the shortfall raw: it is the same 503 as Scripts.run's.
            response = problem_response(unconfirmed_problem(error))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            response = await _redis_unavailable(request, error)
        except redis.exceptions.ResponseError as error:
            response = _redis_refused(request, error)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            response = problem_response(ProblemError("internal_error"))
        status = response.status
        response.headers["X-Request-ID"] = request_id
        return response
    except web.HTTPException as error:  # a redirect, passed through
        status = error.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        elapsed = time.perf_counter() - started
        if control is not None:
            control.done(route, elapsed)
        record(request, response, status, elapsed)
        request_id_var.reset(token)


def _http_problem(request: web.Request, error: web.HTTPException) -> web.Response:
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


async def _redis_unavailable(request: web.Request, error: Exception) -> web.Response:
    log.warning("redis unavailable: %s", error.__class__.__name__)
    if isinstance(error, redis.exceptions.ConnectionError):
        # One dead connection means Redis went away: its idle siblings are
        # dead too. Drop them now, so the first requests after Redis comes
        # back reconnect instead of each failing on a stale socket.
        # (A cluster client has a pool per node and drops a failed node's itself.)
        pool = getattr(request.app[appkeys.REDIS], "connection_pool", None)
        if pool is not None:
            await pool.disconnect(inuse_connections=False)
    return problem_response(retry_later("service_unavailable", 1, "The data store is unavailable"))


# Refusals that pass: a long script, a loading server, a replica (or, on a cluster,
# a primary that lost its replica: NOREPLICAS; a failover or reshard under way).
_BUSY_REPLIES = ("BUSY", "LOADING", "READONLY", "NOREPLICAS", "CLUSTERDOWN", "TRYAGAIN")
_BUSY_ERRORS = (
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
)


def _redis_refused(request: web.Request, error: redis.exceptions.ResponseError) -> web.Response:
    busy = isinstance(error, _BUSY_ERRORS) or any(word in str(error) for word in _BUSY_REPLIES)
    if busy:
        return problem_response(retry_later("service_unavailable", 1, "The data store is busy"))
    log.exception("redis error on %s %s", request.method, request.path)
    return problem_response(ProblemError("internal_error"))
