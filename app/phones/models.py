"""Request and response shapes of the phone catalogue."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any, ClassVar

import msgspec

from app.fields import Description, ImageUrl, Name, PriceCents, RestockUnits, StockUnits


class PhoneCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Name
    description: Description = ""
    image_url: ImageUrl = ""
    price_cents: PriceCents
    stock: StockUnits = 0


# 0.01 to 10000000, at most 2 decimals, no sign, exponent or spaces.
PRICE_PATTERN = (
    r"^(?:[1-9][0-9]{0,6}(?:\.[0-9]{1,2})?|10000000(?:\.00?)?|0\.(?:0[1-9]|[1-9][0-9]?))$"
)
_PRICE = re.compile(PRICE_PATTERN)


def _seed_price(value: Any) -> Decimal:
    """The seed's price as an exact Decimal: from a JSON number (already an int
    or Decimal, see app.json_body.decode_body) or a decimal string."""
    if isinstance(value, str) and _PRICE.fullmatch(value):
        return Decimal(value)
    if isinstance(value, int | Decimal) and not isinstance(value, bool):
        price = Decimal(value)
        exact = price.is_finite() and price.as_tuple().exponent >= -2
        if exact and Decimal("0.01") <= price <= Decimal(10**7):
            return price
    raise ValueError("price must be an amount from 0.01 to 10000000 with at most 2 decimals")


class SeedPhoneCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /phones/create: the seed's body (imageurl, price as a currency
    amount) or ours; stock defaults to 0."""

    name: Name
    description: Description = ""
    image_url: ImageUrl | msgspec.UnsetType = msgspec.UNSET
    imageurl: ImageUrl | msgspec.UnsetType = msgspec.UNSET
    price_cents: PriceCents | msgspec.UnsetType = msgspec.UNSET
    # A JSON number (read exactly, so 19.99 is 1999 cents) or a plain decimal
    # string; checked in __post_init__, described by __openapi_extra__.
    price: Any = msgspec.UNSET
    stock: StockUnits = 0

    __openapi_extra__: ClassVar[dict] = {
        "properties": {
            "price": {
                "description": "A currency amount, at most 2 decimals, as a JSON number or a string",
                "anyOf": [
                    {"type": "number", "minimum": 0.01, "maximum": 10**7, "multipleOf": 0.01},
                    {"type": "string", "pattern": PRICE_PATTERN},
                ],
            }
        },
        "allOf": [
            {"oneOf": [{"required": ["price_cents"]}, {"required": ["price"]}]},
            {"not": {"required": ["image_url", "imageurl"]}},
        ],
    }

    def __post_init__(self) -> None:
        if self.image_url is not msgspec.UNSET and self.imageurl is not msgspec.UNSET:
            raise ValueError("give either image_url or imageurl, not both")
        if (self.price_cents is msgspec.UNSET) == (self.price is msgspec.UNSET):
            raise ValueError("give exactly one of price_cents or price")
        if self.price is not msgspec.UNSET:
            self.price = _seed_price(self.price)

    def to_create(self) -> PhoneCreate:
        image_url = self.image_url if self.image_url is not msgspec.UNSET else self.imageurl
        price_cents = (
            self.price_cents if self.price_cents is not msgspec.UNSET else int(self.price * 100)
        )
        return PhoneCreate(
            name=self.name,
            description=self.description,
            image_url="" if image_url is msgspec.UNSET else image_url,
            price_cents=price_cents,
            stock=self.stock,
        )


class PhoneUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Name | msgspec.UnsetType = msgspec.UNSET
    description: Description | msgspec.UnsetType = msgspec.UNSET
    image_url: ImageUrl | msgspec.UnsetType = msgspec.UNSET
    price_cents: PriceCents | msgspec.UnsetType = msgspec.UNSET

    __openapi_extra__: ClassVar[dict] = {"minProperties": 1}

    def __post_init__(self) -> None:
        if not self.changes():
            raise ValueError("give at least one of name, description, image_url, price_cents")

    def changes(self) -> dict[str, str | int]:
        return {
            field: value
            for field in self.__struct_fields__
            if (value := getattr(self, field)) is not msgspec.UNSET
        }


class Restock(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    quantity: RestockUnits


# The seed's names of our fields, as answered on the seed's ports (app/seed.py).
SEED_IMAGEURL = {
    "type": "string",
    "description": "Only on the seed's ports (5555, 7777): image_url under the seed's name",
}
SEED_PRICE = {
    "type": "number",
    "multipleOf": 0.01,
    "description": "Only on the seed's ports (5555, 7777): the price as a currency amount, "
    "price_cents / 100",
}


class Phone(msgspec.Struct, kw_only=True):
    id: str
    name: str
    description: str
    image_url: str
    price_cents: int
    stock: int
    created_at: str
    # Set only for requests that came in on a seed port.
    imageurl: str | msgspec.UnsetType = msgspec.UNSET
    price: Decimal | msgspec.UnsetType = msgspec.UNSET

    __openapi_extra__: ClassVar[dict] = {
        "properties": {"imageurl": SEED_IMAGEURL, "price": SEED_PRICE}
    }


class PhoneEnvelope(msgspec.Struct, kw_only=True):
    phone: Phone


class PhonePage(msgspec.Struct, kw_only=True):
    phones: list[Phone]
    page: int
    per_page: int
    total: int
    pageCount: int
