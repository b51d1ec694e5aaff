"""The conservation audit: stock and money balance against everything ever added.

All rows are read in one MULTI/EXEC, so the figures are one consistent
snapshot even while orders keep flowing; WATCH on the three indexes retries
when a phone, customer or order was added between listing and reading.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import WatchError

from app import keys
from app.problems import retry_later

ATTEMPTS = 10


async def _snapshot(redis: Redis) -> tuple[list[str], list[str], list[str], list[Any]]:
    indexes = (keys.PHONES, keys.CUSTOMERS, keys.ORDERS)
    for _ in range(ATTEMPTS):
        async with redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(*indexes)
                phone_ids, customer_ids, order_ids = [
                    [member.decode() for member in await pipe.zrange(index, 0, -1)]
                    for index in indexes
                ]
                pipe.multi()
                for phone_id in phone_ids:
                    pipe.hmget(keys.phone(phone_id), ["stock", "added_units"])
                for customer_id in customer_ids:
                    pipe.hmget(keys.customer(customer_id), ["balance_cents", "added_cents"])
                for order_id in order_ids:
                    pipe.hmget(keys.order(order_id), ["status", "items", "total_cents"])
                rows = await pipe.execute()
            except WatchError:
                continue
            return phone_ids, customer_ids, order_ids, rows
    raise retry_later("audit_busy", 1)


async def run_audit(redis: Redis) -> dict[str, Any]:
    phone_ids, customer_ids, order_ids, rows = await _snapshot(redis)
    phone_rows = rows[: len(phone_ids)]
    customer_rows = rows[len(phone_ids) : len(phone_ids) + len(customer_ids)]
    order_rows = rows[len(phone_ids) + len(customer_ids) :]

    # An index member whose hash is gone breaks the books: report it, never crash.
    dangling = [
        {"index": index, "id": member}
        for index, members, member_rows in (
            (keys.PHONES, phone_ids, phone_rows),
            (keys.CUSTOMERS, customer_ids, customer_rows),
            (keys.ORDERS, order_ids, order_rows),
        )
        for member, row in zip(members, member_rows, strict=True)
        if row[0] is None
    ]
    sold: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    live_totals = 0
    for status, items, total in order_rows:
        if status is None:
            continue
        status = status.decode()
        statuses[status] += 1
        if status in ("open", "completed"):
            live_totals += int(total)
            for entry in items.decode().split(";"):
                phone_id, quantity, _ = entry.split(":")
                sold[phone_id] += int(quantity)

    mismatched_phones = []
    negative_stock = []
    stock_units = added_units = 0
    for phone_id, (stock, added) in zip(phone_ids, phone_rows, strict=True):
        if stock is None:
            continue
        stock, added = int(stock), int(added)
        stock_units += stock
        added_units += added
        if stock < 0:
            negative_stock.append(phone_id)
        if stock + sold[phone_id] != added:
            mismatched_phones.append(
                {"phone_id": phone_id, "stock": stock, "sold": sold[phone_id], "added": added}
            )

    balances = added_cents = 0
    negative_balances = []
    for customer_id, (balance, added) in zip(customer_ids, customer_rows, strict=True):
        if balance is None:
            continue
        balance, added = int(balance), int(added)
        balances += balance
        added_cents += added
        if balance < 0:
            negative_balances.append(customer_id)
    money_ok = balances + live_totals == added_cents
    stock_ok = not mismatched_phones
    return {
        "ok": money_ok
        and stock_ok
        and not negative_stock
        and not negative_balances
        and not dangling,
        "stock": {
            "ok": stock_ok,
            "phones": len(phone_ids),
            "stock_units": stock_units,
            "sold_units": sum(sold.values()),
            "added_units": added_units,
            "mismatches": mismatched_phones,
        },
        "money": {
            "ok": money_ok,
            "customers": len(customer_ids),
            "balances_cents": balances,
            "live_order_totals_cents": live_totals,
            "added_cents": added_cents,
        },
        "negative_stock": negative_stock,
        "negative_balances": negative_balances,
        "dangling_index_entries": dangling,
        "orders": {"total": len(order_ids), **{s: statuses[s] for s in keys.ORDER_STATUSES}},
    }
