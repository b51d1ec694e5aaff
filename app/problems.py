"""Domain errors and their RFC 9457 problem+json rendering: one table of code,
status and title."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from app.vocabulary import OPEN, ORDER_STATUSES

PROBLEM_CONTENT_TYPE = "application/problem+json"
# The code of a problem answer, kept on the response for the metrics (app/observe.py).
PROBLEM_CODE: web.ResponseKey[str] = web.ResponseKey("problem_code")
TYPE_BASE = "https://phoneshop.example/problems/"

# code -> (HTTP status, title). Codes are stable; clients branch on them.
PROBLEMS: dict[str, tuple[int, str]] = {
    "malformed_json": (400, "The body is not valid JSON"),
    "json_too_deep": (400, "The JSON nests too deeply"),
    "invalid_idempotency_key": (400, "The Idempotency-Key header is not valid"),
    "unauthorized": (401, "A valid bearer token is required"),
    "insufficient_funds": (402, "The balance does not cover the order"),
    "forbidden": (403, "This token may not do that"),
    "not_found": (404, "No such resource"),
    "phone_not_found": (404, "Phone not found"),
    "customer_not_found": (404, "Customer not found"),
    "order_not_found": (404, "Order not found"),
    "method_not_allowed": (405, "Method not allowed"),
    "out_of_stock": (409, "Not enough stock"),
    "email_taken": (409, "That email already belongs to a customer"),
    # A check or cancel of an order that is no longer open is refused with its
    # status (app/lua/check_order.lua, cancel_order.lua): order_cancelled, ...
    **{
        f"order_{status}": (409, f"The order is {status}")
        for status in ORDER_STATUSES
        if status != OPEN
    },
    "order_owner_changed": (409, "The order changed while being read; retry"),
    # A script's keys were for another status chunk (docs/data-tier.md 10.2): the app
    # retries with the chunk the script answered, so neither reaches a client.
    "order_chunk_stale": (409, "The order's chunk moved on; retry"),
    "order_chunk_moved": (409, "The order is in another chunk; retry"),
    "idempotency_key_in_use": (409, "A request with this Idempotency-Key is in progress"),
    "stock_limit": (409, "The stock would exceed its limit"),
    "balance_limit": (409, "The balance would exceed its limit"),
    "payload_too_large": (413, "The body is too large"),
    "unsupported_media_type": (415, "The body must be application/json"),
    "validation_error": (422, "The request is not valid"),
    "idempotency_key_reused": (422, "This Idempotency-Key was used with a different body"),
    "internal_error": (500, "Internal error"),
    "service_unavailable": (503, "The service is unavailable; retry later"),
    "overloaded": (503, "Too many requests in flight; retry later"),
    "queued_too_long": (503, "The request waited too long in line; retry later"),
    # A short pool whose phone has units lent to stripes (docs/escrow.md, section 5): the
    # order path recalls them and tries again, so this reaches a client only when the
    # recall could not finish (the settler then does).
    "stock_lent": (503, "The stock is being recalled from other shards; retry"),
    # On a Redis Cluster: the write is on the primary but its replica did not
    # confirm it in time (docs/data-tier.md, section 6). Retrying with the same
    # Idempotency-Key replays the answer if the write survived.
    "write_unconfirmed": (
        503,
        "The write is not confirmed yet; retry with the same Idempotency-Key",
    ),
}


class ProblemError(Exception):
    """A domain error that becomes a problem+json response.

    ``extra`` members are added to the problem object (RFC 9457 extensions).
    """

    def __init__(self, code: str, detail: str | None = None, **extra: Any) -> None:
        status, title = PROBLEMS[code]
        super().__init__(detail or title)
        self.code = code
        self.status = status
        self.title = title
        self.detail = detail or title
        self.extra = extra
        self.headers: dict[str, str] = {}


def problem_body(code: str, status: int, title: str, detail: str, extra: dict[str, Any]) -> bytes:
    body = {
        "type": TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    return msgspec.json.encode(body)


def problem_response(error: ProblemError) -> web.Response:
    response = web.Response(
        status=error.status,
        body=problem_body(error.code, error.status, error.title, error.detail, error.extra),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=error.headers,
    )
    response[PROBLEM_CODE] = error.code
    return response


def retry_later(code: str, retry_after: int = 1, detail: str | None = None) -> ProblemError:
    error = ProblemError(code, detail)
    error.headers["Retry-After"] = str(retry_after)
    return error
