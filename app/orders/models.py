"""Request and response shapes of orders."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, ClassVar

import msgspec

from app.fields import Id, Quantity

MAX_LINES = 50
MAX_QUANTITY = 100
# The seed's list form: at most this many entries, so at most 50 distinct
# phones and 50 units of one, both within the line limits.
MAX_SEED_PHONES = MAX_LINES


class OrderLine(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    phone_id: Id
    quantity: Quantity


class OrderCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Either ``items`` or the seed's ``phones`` list, where a repeated id
    counts as one more unit. ``customer_id`` (seed: ``customer``) is for the
    admin placing an order on a customer's behalf."""

    items: Annotated[list[OrderLine], msgspec.Meta(min_length=1, max_length=MAX_LINES)] | (
        msgspec.UnsetType
    ) = msgspec.UNSET
    phones: Annotated[list[Id], msgspec.Meta(min_length=1, max_length=MAX_SEED_PHONES)] | (
        msgspec.UnsetType
    ) = msgspec.UNSET
    autocheck: bool = True
    customer_id: Id | msgspec.UnsetType = msgspec.UNSET
    customer: Id | msgspec.UnsetType = msgspec.UNSET

    __openapi_extra__: ClassVar[dict] = {
        "allOf": [
            {"oneOf": [{"required": ["items"]}, {"required": ["phones"]}]},
            {"not": {"required": ["customer_id", "customer"]}},
        ]
    }

    def __post_init__(self) -> None:
        if (self.items is msgspec.UNSET) == (self.phones is msgspec.UNSET):
            raise ValueError("give exactly one of items or phones")
        if self.customer_id is not msgspec.UNSET and self.customer is not msgspec.UNSET:
            raise ValueError("give customer_id or customer, not both")

    def lines(self) -> list[tuple[str, int]]:
        """One line per phone, in first-seen order: repeats add up, as in the
        seed's list form (the stock check sees the whole quantity at once). A dict, not
        a Counter: once per order, and a Counter's making and missing keys cost 1.3 us
        against 0.4 (P1)."""
        quantities: dict[str, int] = {}
        if self.items is not msgspec.UNSET:
            for line in self.items:
                quantities[line.phone_id] = quantities.get(line.phone_id, 0) + line.quantity
        else:
            for phone_id in self.phones:
                quantities[phone_id] = quantities.get(phone_id, 0) + 1
        return list(quantities.items())

    def for_customer(self) -> str | None:
        if self.customer_id is not msgspec.UNSET:
            return self.customer_id
        if self.customer is not msgspec.UNSET:
            return self.customer
        return None


class OrderItem(msgspec.Struct, kw_only=True):
    phone_id: str
    quantity: int
    unit_price_cents: int
    line_total_cents: int
    # Set only for requests that came in on a seed port (app/seed.py).
    price: Decimal | msgspec.UnsetType = msgspec.UNSET

    __openapi_extra__: ClassVar[dict] = {
        "properties": {
            "price": {
                "type": "number",
                "multipleOf": 0.01,
                "description": "Only on the seed's ports (5555, 7777): the unit price as a "
                "currency amount, unit_price_cents / 100",
            }
        }
    }


class Order(msgspec.Struct, kw_only=True):
    id: str
    customer_id: str
    status: str
    items: list[OrderItem]
    total_cents: int
    created_at: str


class OrderEnvelope(msgspec.Struct, kw_only=True):
    order: Order


class OrderPage(msgspec.Struct, kw_only=True):
    orders: list[Order]
    page: int
    per_page: int
    total: int
    pageCount: int
