"""Phone catalogue operations: each write is one Lua script."""

from __future__ import annotations

import time
from collections.abc import Callable

from app import keys
from app.fields import STOCK_LIMIT
from app.orders.settler import SETTLE_INTERVAL_S
from app.partitions import partition_of
from app.phones import stripes
from app.phones.models import Phone, PhoneCreate, PhoneUpdate
from app.phones.page_cache import CataloguePages
from app.problems import ProblemError
from app.query import Page
from app.redis_gateway import RedisGateway
from app.scripts import Scripts
from app.timestamps import iso_time
from app.vocabulary import STRIPED, new_phone_id


def phone_from_fields(fields: dict[str, str]) -> Phone:
    return Phone(
        id=fields["id"],
        name=fields["name"],
        description=fields["description"],
        image_url=fields["image_url"],
        price_cents=int(fields["price_cents"]),
        stock=int(fields["stock"]),
        created_at=iso_time(fields["created_at"]),
    )


def create_phone_keys(phone_id: str) -> list[str]:
    """create_phone.lua's KEYS, in the order its header lists them."""
    partition = partition_of(phone_id)
    return [
        keys.phone(phone_id),
        keys.phones(partition),
        keys.phones_seq(partition),
        keys.ledger(partition),
    ]


async def create_phone(scripts: Scripts, data: PhoneCreate) -> Phone:
    phone_id = new_phone_id()
    result = await scripts.run(
        "create_phone",
        create_phone_keys(phone_id),
        [
            phone_id,
            data.name,
            data.description,
            data.image_url,
            data.price_cents,
            data.stock,
            int(time.time() * 1000),
        ],
    )
    return phone_from_fields(result.payload)


async def get_phone(gateway: RedisGateway, phone_id: str) -> Phone:
    fields = await gateway.hgetall(keys.phone(phone_id))
    if not fields:
        raise ProblemError("phone_not_found", f"No phone with id {phone_id}")
    await stripes.show_stripe_stock(gateway, [fields])
    return phone_from_fields(fields)


async def list_phones(
    gateway: RedisGateway, pages: CataloguePages, page: Page
) -> tuple[int, list[Phone]]:
    """Oldest first, over every partition's catalogue (app/paging.py), through this
    worker's remembered pages (app/phones/page_cache.py). A striped phone's stock is its
    pool's and its stripes' (app/phones/stripes.py: one more round trip for a page with
    such rows, none for the others)."""
    total, rows = await pages.page(gateway, page)
    await stripes.show_stripe_stock(gateway, rows)
    return total, [phone_from_fields(row) for row in rows]


def update_phone_keys(phone_id: str) -> list[str]:
    """update_phone.lua's KEYS, in the order its header lists them."""
    return [
        keys.phone(phone_id),
        keys.stripe_hosts(phone_id),
        keys.reprices_due(partition_of(phone_id)),
    ]


async def update_phone(scripts: Scripts, phone_id: str, data: PhoneUpdate) -> Phone:
    """One script; for a striped phone's new price, the stripes' too before the answer
    (app/phones/stripes.py). A reprice left undone (the request died) is due for the
    settler's sweep after its interval. The answer shows the stock as GET does."""
    due = int((time.time() + SETTLE_INTERVAL_S) * 1000)
    args: list[str | int] = [keys.reprice_entry(phone_id), due]
    for field, value in data.changes().items():
        args += [field, value]
    result = await scripts.run("update_phone", update_phone_keys(phone_id), args)
    if result.more:
        await stripes.reprice_after_update(scripts, phone_id, result.more)
    await stripes.show_stripe_stock(scripts.gateway, [result.payload])
    return phone_from_fields(result.payload)


async def restock(
    scripts: Scripts,
    phone_id: str,
    quantity: int,
    on_striped: Callable[[list[str]], None] | None = None,
) -> Phone:
    """restock.lua; a striped phone's restock (its pool deep again) hands the phone to
    ``on_striped`` (the worker's refiller: a grant to each other primary's host, after the
    answer; docs/escrow.md, section 6). The answer shows the stock as GET does."""
    result = await scripts.run(
        "restock", [keys.phone(phone_id), keys.ledger_of(phone_id)], [quantity, STOCK_LIMIT]
    )
    if on_striped is not None and result.payload.get("mode") == STRIPED:
        on_striped([phone_id])
    await stripes.show_stripe_stock(scripts.gateway, [result.payload])
    return phone_from_fields(result.payload)
