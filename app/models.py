"""Shared request-shape building blocks and the one JSON decoder of bodies.

Validation of untrusted input lives here and in each domain's models.py: the
only place that sees raw JSON. Scripts trust what reaches them.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Annotated, Any, TypeVar

import msgspec
from aiohttp import web

from app.ids import ID_PATTERN
from app.problems import ProblemError
from app.vocabulary import ORDER_STATUSES

# No C0/C1 control characters (CR, LF, NUL, tab, ...) nor Unicode line
# separators anywhere: nothing a client types can become a mail header.
_CONTROLS = "\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029"
_NO_CONTROLS = f"^[^{_CONTROLS}]*$"
# Python's "$" also matches before a final newline, so the pattern above
# (right under JSON Schema's ECMA semantics) lets "abc\\n" through here;
# decode_body checks every decoded string again with this.
_ANY_CONTROL = re.compile(f"[{_CONTROLS}]")


def text(max_length: int, min_length: int = 1, description: str = "") -> Any:
    return Annotated[
        str,
        msgspec.Meta(
            min_length=min_length,
            max_length=max_length,
            pattern=_NO_CONTROLS,
            description=description or None,
        ),
    ]


Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN, description="An opaque 22-character id")]
Name = text(200)
Description = text(5000, min_length=0)
ImageUrl = text(2048, min_length=0, description="Any string, relative paths included")
# ASCII-only, deliberately plain: a mail address with no display name, quotes or comments.
Email = Annotated[
    str,
    msgspec.Meta(
        max_length=254,
        pattern=r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$",
    ),
]
# The ceilings. Lua numbers are doubles, exact only below 2^53 (about 9.007e15),
# so every sum a script makes must stay below it. No path may leave a balance
# above BALANCE_LIMIT or a stock above STOCK_LIMIT: deposit and restock refuse
# past them, and so does cancel_order when its refund or its restock would
# cross them (409, nothing changed). Then the largest sums a script makes are
# a balance plus a refund (<= 2 * 10**15, an order never costs more than the
# balance it was placed from) and a stock plus a restock (<= 10**12 + 10**9).
BALANCE_LIMIT = 10**15
STOCK_LIMIT = 10**12

PriceCents = Annotated[int, msgspec.Meta(ge=1, le=10**9)]
StockUnits = Annotated[int, msgspec.Meta(ge=0, le=10**9)]
RestockUnits = Annotated[int, msgspec.Meta(ge=1, le=10**9)]
BalanceCents = Annotated[int, msgspec.Meta(ge=0, le=10**12)]
AmountCents = Annotated[int, msgspec.Meta(ge=1, le=10**12)]
Quantity = Annotated[int, msgspec.Meta(ge=1, le=100)]

T = TypeVar("T")

MAX_PER_PAGE = 100
MAX_PAGE = 10**8

# Printable ASCII, as the IETF Idempotency-Key draft's examples (UUIDs and the like).
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"

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


# JSON numbers are read as Decimal, exactly: a seed price of 19.99 is 1999
# cents, never 1998.9999.
_JSON = msgspec.json.Decoder(float_hook=Decimal)
# Past this many digits a number is out of every bound we have; converting it
# to an int would only cost time (1e999999999 has a billion digits).
_MAX_INT_DIGITS = 19


# The deepest body we accept is 3 levels ({"items": [{...}]}); past this a
# document is refused before any walk, so no nesting reaches a recursion limit.
MAX_JSON_DEPTH = 32


def _integral(value: Decimal) -> int | Decimal:
    """JSON Schema's "integer" includes 2.0 and 1e3, and /openapi.json publishes
    JSON Schema, so integral numbers count as integers; 1.5 stays a Decimal and
    is refused wherever an integer is expected."""
    if (
        value.is_finite()
        and value.adjusted() < _MAX_INT_DIGITS
        and value == value.to_integral_value()
    ):
        return int(value)
    return value


def _prepare(document: Any) -> bool:
    """Turn integral numbers into ints in place, and tell whether any string
    holds a control character. Iterative, and refuses depth past MAX_JSON_DEPTH."""
    has_control = False
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        container, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        slots = container.items() if isinstance(container, dict) else enumerate(container)
        for slot, item in list(slots):
            if isinstance(item, Decimal):
                container[slot] = _integral(item)
            elif isinstance(item, str):
                has_control = has_control or _ANY_CONTROL.search(item) is not None
            elif isinstance(item, dict | list):
                stack.append((item, depth + 1))
    return has_control


def _too_deep() -> ProblemError:
    return ProblemError("json_too_deep", f"JSON may nest at most {MAX_JSON_DEPTH} levels")


async def decode_body(request: web.Request, model: type[T]) -> T:
    """Read and validate a JSON body into ``model``: 415, 400 or 422 otherwise."""
    if request.content_type != "application/json":
        raise ProblemError(
            "unsupported_media_type", f"Got {request.content_type or 'no content type'}"
        )
    raw = await request.read()
    try:
        document = _JSON.decode(raw)
    except msgspec.DecodeError as error:
        raise ProblemError("malformed_json", str(error)) from None
    except RecursionError:
        # msgspec's own guard, far past MAX_JSON_DEPTH: same answer.
        raise _too_deep() from None
    if isinstance(document, dict | list):
        has_control = _prepare(document)
    elif isinstance(document, Decimal):
        document, has_control = _integral(document), False
    else:
        has_control = isinstance(document, str) and _ANY_CONTROL.search(document) is not None
    try:
        value = msgspec.convert(document, type=model, strict=True)
    except msgspec.ValidationError as error:
        raise ProblemError(
            "validation_error", str(error).replace("`decimal`", "a fraction")
        ) from None
    if has_control:
        raise ProblemError("validation_error", "Control characters are not allowed in text")
    return value


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


def iso_time(ms: str | int) -> str:
    moment = dt.datetime.fromtimestamp(int(ms) / 1000, tz=dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Decimals (the seed's amounts, app/seed.py) are written as JSON numbers: 49.99.
_ENCODER = msgspec.json.Encoder(decimal_format="number")


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_ENCODER.encode(data),
        status=status,
        content_type="application/json",
        headers=headers,
    )
