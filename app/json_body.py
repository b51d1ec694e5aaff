"""The one JSON decoder of request bodies: 415, 400 or 422, or a validated model."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from app.fields import CONTROL_CHARACTERS
from app.problems import ProblemError

T = TypeVar("T")

# The field types' pattern is right under JSON Schema's ECMA semantics, but
# Python's "$" also matches before a final newline, so it lets "abc\\n" through
# here; decode_body checks every decoded string again with this.
_ANY_CONTROL = re.compile(f"[{CONTROL_CHARACTERS}]")

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
