"""Query parameters: their parsers, their schemas for /openapi.json, and the page asked for."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from app.ids import ID_PATTERN
from app.problems import ProblemError
from app.vocabulary import ORDER_STATUSES

MAX_PER_PAGE = 100
MAX_PAGE = 10**8

# The query parameters' schemas, for /openapi.json; the parsers below enforce them.
QUERY_SCHEMAS: dict[str, dict[str, Any]] = {
    "page": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
    "per_page": {"type": "integer", "minimum": 1, "maximum": MAX_PER_PAGE},
    "status": {"type": "string", "enum": list(ORDER_STATUSES)},
    "customer_id": {"type": "string", "pattern": ID_PATTERN},
    "ms": {"type": "integer", "minimum": 0, "maximum": 10_000},
}


class Page(msgspec.Struct, frozen=True):
    page: int
    per_page: int

    def counts(self, total: int) -> dict[str, int]:
        """The paging members of every list answer (the seed's shape)."""
        return {
            "page": self.page,
            "per_page": self.per_page,
            "total": total,
            "pageCount": page_count(total, self.per_page),
        }


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9) or not low <= int(raw) <= high:
        raise ProblemError(
            "validation_error", f"Query parameter {name!r} must be an integer from {low} to {high}"
        )
    return int(raw)


def page_params(request: web.Request, default_per_page: int = 10) -> Page:
    return Page(
        page=query_int(request, "page", 1, 1, MAX_PAGE),
        per_page=query_int(request, "per_page", default_per_page, 1, MAX_PER_PAGE),
    )


def page_count(total: int, per_page: int) -> int:
    return -(-total // per_page)
