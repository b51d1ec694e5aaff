"""The field types request bodies are validated with, and the ceilings of money and stock.

Validation of untrusted input lives here, in app/json_body.py (the one JSON
decoder of bodies) and in each domain's models.py: the only places that see raw
JSON. Scripts trust what reaches them.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from app.ids import ID_PATTERN

# No C0/C1 control characters (CR, LF, NUL, tab, ...) nor Unicode line
# separators anywhere: nothing a client types can become a mail header.
CONTROL_CHARACTERS = "\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029"
_NO_CONTROLS = f"^[^{CONTROL_CHARACTERS}]*$"


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

# Printable ASCII, as the IETF Idempotency-Key draft's examples (UUIDs and the like).
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"
