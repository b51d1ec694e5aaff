"""The seed's API on its own ports (nginx's SEED_PHONES_PORT and SEED_ORDERS_PORT).

nginx names the seed service a request came in on in the X-PhoneShop-Seed
header (nginx/nginx.conf.template), replacing any the client sent. Answers to
such requests carry the seed's field names as well, next to ours: a phone's
``imageurl`` and ``price`` (a currency amount), an order line's ``price``.
Money stays integer cents everywhere else; the amounts are exact Decimals,
written as JSON numbers (app.responses.json_response).
"""

from __future__ import annotations

from decimal import Decimal

import msgspec
from aiohttp import web

from app import appkeys
from app.orders.models import Order
from app.phones.models import Phone

SEED_HEADER = "X-PhoneShop-Seed"
SEED_SERVICES = frozenset({"phones", "orders"})


def seed_service(request: web.Request) -> str | None:
    """The seed service the request came in on, or None (our own port). Trusted
    only behind nginx, like X-Request-ID."""
    if not request.app[appkeys.SETTINGS].behind_proxy:
        return None
    service = request.headers.get(SEED_HEADER)
    return service if service in SEED_SERVICES else None


def amount(cents: int) -> Decimal:
    """Integer cents as the seed's decimal amount, exactly: 4999 -> 49.99."""
    return Decimal(cents).scaleb(-2)


def phone_for(request: web.Request, phone: Phone) -> Phone:
    if seed_service(request) is None:
        return phone
    return msgspec.structs.replace(phone, imageurl=phone.image_url, price=amount(phone.price_cents))


def order_for(request: web.Request, order: Order) -> Order:
    if seed_service(request) is None:
        return order
    items = [
        msgspec.structs.replace(item, price=amount(item.unit_price_cents)) for item in order.items
    ]
    return msgspec.structs.replace(order, items=items)
