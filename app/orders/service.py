"""Order operations. Checking is one Lua script; placing and cancelling are the
reservation saga (app/orders/saga_service.py), whose collapsed form, when one node
serves every partition the order touches, is one script each: ``place_order`` and
``cancel_on_one_node`` here. This module only builds their keys and arguments and
shapes their answers.

An order lives in its customer's partition (app/keys.py): its id is minted
there before the script runs, so every later step finds it from the id alone."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Sequence

import msgspec

from app import keys
from app.auth import Principal
from app.fields import BALANCE_LIMIT, STOCK_LIMIT
from app.orders.chunk_hints import HINTS, ChunkHints
from app.orders.idempotency import OLDER_BUCKETS, RecordPlace, fingerprint, record_place
from app.orders.models import Order, OrderItem
from app.paging import merged_lists_page, page_of_hashes, rows_of
from app.partitions import PARTITIONS, chunk_of, partition_of
from app.problems import ProblemError
from app.query import Page
from app.redis_gateway import RedisGateway
from app.scripts import ScriptResult, Scripts, problem_from_script
from app.slot_paging import slot_merged_page_of_hashes
from app.status_lists import StatusLists
from app.timestamps import iso_time
from app.vocabulary import (
    CANCELLED,
    COMPLETED,
    OPEN,
    ORDER_FIELDS,
    ORDER_STATUSES,
    decode_items,
    new_order_id,
    order_fields,
)

# Tries of a placing script whose id's chunk was stale: each retry is minted for the chunk
# the refusal answered, so a second refusal takes CHUNK_ORDERS other orders in between.
CHUNK_TRIES = 4


def order_items(items: str) -> list[OrderItem]:
    return [
        OrderItem(
            phone_id=line.phone_id,
            quantity=line.quantity,
            unit_price_cents=line.unit_price_cents,
            line_total_cents=line.quantity * line.unit_price_cents,
        )
        for line in decode_items(items)
    ]


def order_from_fields(fields: dict[str, str]) -> Order:
    """An order from its fields under the long names and its ``id``, as the scripts
    answer them (the prelude's ``order_map``); see order_from_hash for a hash as read."""
    return Order(
        id=fields["id"],
        customer_id=fields["customer_id"],
        status=fields["status"],
        items=order_items(fields["items"]),
        total_cents=int(fields["total_cents"]),
        created_at=iso_time(fields["created_at"]),
    )


def order_from_hash(order_id: str, stored: dict[str, str]) -> Order:
    """An order from its hash as read: the short field names (app/vocabulary.py:
    ORDER_FIELDS), and not the id, which the key holds."""
    return order_from_fields({**order_fields(stored), "id": order_id})


class PlacedOrder(msgspec.Struct, frozen=True):  # a Struct: one per order (ScriptResult)
    order: Order
    replayed: bool


async def replayed_order(gateway: RedisGateway, order_id: str, autocheck: bool) -> Order:
    """The first answer to an Idempotency-Key that placed an order, rebuilt from the order
    (app/orders/idempotency.py): every field it answered is the order's, which never
    change but the status; the status it was created with follows from ``autocheck``,
    which the key's fingerprint covers."""
    fields = await gateway.hgetall(keys.order(order_id))
    if not fields:
        # Orders are never deleted, and the record was written with its order.
        raise ProblemError("internal_error", "The order this Idempotency-Key placed is gone")
    return order_from_fields(
        {**order_fields(fields), "id": order_id, "status": COMPLETED if autocheck else OPEN}
    )


async def answered_order(
    gateway: RedisGateway, payload: dict, replayed: bool, autocheck: bool
) -> PlacedOrder:
    """A placing script's 201: the order it answered, or the one a replay names."""
    if replayed:
        return PlacedOrder(await replayed_order(gateway, payload["replay_of"], autocheck), True)
    return PlacedOrder(order_from_fields(payload), False)


def idempotency_request(
    customer_id: str,
    lines: list[tuple[str, int]],
    autocheck: bool,
    idempotency_key: str | None,
    idempotency_ttl: int,
) -> tuple[RecordPlace | None, list[str | bytes | int]]:
    """Where the request's Idempotency-Key record is, and the three ARGV the placing
    scripts take about it: "1"/"0", the record's field then the fingerprint, and when
    the newest bucket expires."""
    if idempotency_key is None:
        return None, ["0", b"", 0]
    place = record_place(customer_id, idempotency_key, idempotency_ttl, int(time.time()))
    request = place.field + fingerprint(customer_id, lines, autocheck)
    return place, ["1", request, place.expire_at]


def new_order_keys(
    customer_id: str, order_id: str, status: str, record: RecordPlace | None, chunk: int
) -> list[str]:
    """The KEYS that place_order.lua and commit_order.lua both start with: everything a
    new order writes in its customer's partition (the order id was minted in it), its
    status list's chunk ``chunk``'s. Their last KEYS are ``record_buckets(customer_id,
    record)``."""
    status_list, clock, events, ledger = _partition_order_keys(
        partition_of(order_id), status, chunk
    )
    customer, customer_orders = _customer_keys(customer_id, status)
    return [
        customer,
        newest_bucket(customer_id, record),
        keys.order(order_id),
        status_list,
        customer_orders,
        clock,
        events,
        ledger,
    ]


# A customer's keys and a phone's are the same for each of their orders: spelt once, not
# per order (P1, docs/data-tier.md 10.2). The busy ones stay; the others fall out.
_ENTITY_KEYS_CACHED = 16384


@functools.lru_cache(maxsize=_ENTITY_KEYS_CACHED)
def _customer_keys(customer_id: str, status: str) -> tuple[str, str]:
    return keys.customer(customer_id), keys.customer_orders_by_status(customer_id, status)


@functools.lru_cache(maxsize=_ENTITY_KEYS_CACHED)
def _phone_keys(phone_id: str) -> tuple[str, str]:
    """A phone's hash and its partition's ledger."""
    return keys.phone(phone_id), keys.ledger_of(phone_id)


# The partition's keys a placement names depend on (partition, status, chunk) alone, and
# every order of a chunk names the same: built once per chunk, not per order (P1,
# docs/data-tier.md 10.2). A few chunks a partition are live at a time; older ones fall out.
_CHUNK_KEYS_CACHED = 4096


@functools.lru_cache(maxsize=_CHUNK_KEYS_CACHED)
def _partition_order_keys(partition: int, status: str, chunk: int) -> tuple[str, ...]:
    return (
        keys.orders_by_status(partition, status, chunk),
        keys.orders_seq(partition),
        keys.events(partition),
        keys.ledger(partition),
    )


@functools.lru_cache(maxsize=_CHUNK_KEYS_CACHED)
def chunk_entry_keys(partition: int, status: str, chunk: int) -> tuple[str, ...]:
    """What the placing scripts keep beside a status chunk (after new_order_keys): the
    status's chunk directory and counts, the partition's chunk starts, and the next
    chunk's status zset (where an order goes when the chunk moved on just before it)."""
    return (
        keys.order_chunks(partition, status),
        keys.order_chunk_counts(partition, status),
        keys.order_chunk_state(partition),
        keys.orders_by_status(partition, status, chunk + 1),
    )


def chunk_move_keys(partition: int, old: str, new: str, chunk: int) -> list[str]:
    """What a status change keeps beside the two status chunks: both statuses' chunk
    directories, then their counts, the partition's chunk starts (read), and both status
    zsets of the next chunk (the order's, if the chunk moved on while it was placed)."""
    return [
        keys.order_chunks(partition, old),
        keys.order_chunks(partition, new),
        keys.order_chunk_counts(partition, old),
        keys.order_chunk_counts(partition, new),
        keys.order_chunk_state(partition),
        keys.orders_by_status(partition, old, chunk + 1),
        keys.orders_by_status(partition, new, chunk + 1),
    ]


def newest_bucket(customer_id: str, record: RecordPlace | None) -> str:
    """KEYS[2] of the placing scripts: where a new record goes. Without a key the
    scripts touch no bucket, and any name of the customer's partition fills the place."""
    if record is None:
        return keys.idempotency_bucket(partition_of(customer_id), 0)
    return record.newest


def older_buckets(customer_id: str, record: RecordPlace | None) -> Sequence[str]:
    """The placing scripts' last KEYS: the older buckets a record may be in."""
    if record is None:
        return [keys.idempotency_bucket(partition_of(customer_id), 0)] * OLDER_BUCKETS
    return record.older


def place_order_keys(
    customer_id: str,
    order_id: str,
    status: str,
    record: RecordPlace | None,
    phone_ids: list[str],
) -> list[str]:
    """place_order.lua's KEYS, in the order its header lists them."""
    chunk = chunk_of(order_id)
    phone_keys = [_phone_keys(phone_id) for phone_id in phone_ids]
    return [
        *new_order_keys(customer_id, order_id, status, record, chunk),
        *chunk_entry_keys(partition_of(order_id), status, chunk),
        *[phone for phone, _ in phone_keys],
        *[ledger for _, ledger in phone_keys],
        *older_buckets(customer_id, record),
    ]


def check_order_keys(order_id: str, owner_id: str, chunk: int) -> list[str]:
    """check_order.lua's KEYS, in the order its header lists them."""
    partition = partition_of(order_id)
    return [
        keys.order(order_id),
        keys.orders_by_status(partition, OPEN, chunk),
        keys.orders_by_status(partition, COMPLETED, chunk),
        keys.customer_orders_by_status(owner_id, OPEN),
        keys.customer_orders_by_status(owner_id, COMPLETED),
        keys.events(partition),
        keys.customer(owner_id),
        keys.ledger(partition),
        *chunk_move_keys(partition, OPEN, COMPLETED, chunk),
    ]


def cancel_keys(order_id: str, owner_id: str, chunk: int) -> list[str]:
    """The KEYS that cancel_order.lua and refund_order.lua both start with: the order's
    move from open to cancelled and the refund, all in the order's partition."""
    partition = partition_of(order_id)
    return [
        keys.order(order_id),
        keys.customer(owner_id),
        keys.orders_by_status(partition, OPEN, chunk),
        keys.orders_by_status(partition, CANCELLED, chunk),
        keys.customer_orders_by_status(owner_id, OPEN),
        keys.customer_orders_by_status(owner_id, CANCELLED),
        keys.events(partition),
        keys.ledger(partition),
    ]


def cancel_order_keys(order_id: str, owner_id: str, items: str, chunk: int) -> list[str]:
    """cancel_order.lua's KEYS, in the order its header lists them: the order
    partition's, then each line's phone, its partition's ledger, its reservations."""
    phone_ids = [line.phone_id for line in decode_items(items)]
    return [
        *cancel_keys(order_id, owner_id, chunk),
        *chunk_move_keys(partition_of(order_id), OPEN, CANCELLED, chunk),
        *[keys.phone(phone_id) for phone_id in phone_ids],
        *[keys.ledger_of(phone_id) for phone_id in phone_ids],
        *[keys.reservations(partition_of(phone_id)) for phone_id in phone_ids],
    ]


async def place_order(
    scripts: Scripts,
    *,
    order_id: str,
    customer_id: str,
    lines: list[tuple[str, int]],
    autocheck: bool,
    idempotency_key: str | None,
    idempotency_ttl: int,
    request_id: str,
    hints: ChunkHints = HINTS,
) -> PlacedOrder:
    """The saga collapsed: place_order.lua, where one node serves the customer's
    partition and every phone's (``order_id`` minted in the customer's); NotOnOneNode,
    with nothing written, where not. An id whose chunk the script refuses as stale is
    minted again for the chunk it answered (the order's id is the last one minted)."""
    status = COMPLETED if autocheck else OPEN
    record, idempotency = idempotency_request(
        customer_id, lines, autocheck, idempotency_key, idempotency_ttl
    )
    partition = partition_of(order_id)
    for _ in range(CHUNK_TRIES):
        script_keys = place_order_keys(
            customer_id, order_id, status, record, [phone_id for phone_id, _ in lines]
        )
        args: list[str | bytes | int] = [
            order_id,
            customer_id,
            int(time.time() * 1000),
            request_id,
            "1" if autocheck else "0",
            *idempotency,
        ]
        for phone_id, quantity in lines:
            args += [phone_id, quantity]
        try:
            result = await scripts.run("place_order", script_keys, args, one_node=True)
            break
        except ProblemError as error:
            if error.code != "order_chunk_stale":
                raise
            hints.learn(partition, error.extra["chunk"])
            order_id = new_order_id(customer_id, error.extra["chunk"])
    else:
        raise ProblemError("order_chunk_stale")
    if "current_chunk" in result.payload:
        hints.learn(partition, int(result.payload["current_chunk"]))
    if result.status >= 400:  # a stored rejection, replayed
        error = problem_from_script(result.status, result.payload)
        error.headers["Idempotent-Replayed"] = "true"
        raise error
    return await answered_order(scripts.gateway, result.payload, result.flag, autocheck)


async def get_order(gateway: RedisGateway, principal: Principal, order_id: str) -> Order:
    fields = await gateway.hgetall(keys.order(order_id))
    if not fields:
        raise ProblemError("order_not_found")
    order = order_from_hash(order_id, fields)
    if not principal.is_admin and order.customer_id != principal.customer_id:
        raise ProblemError("order_not_found")
    return order


async def _order_owner(gateway: RedisGateway, principal: Principal, order_id: str) -> str:
    if principal.customer_id is not None:
        if partition_of(order_id) != partition_of(principal.customer_id):
            # A customer's orders are all in the customer's partition.
            raise ProblemError("order_not_found")
        return principal.customer_id  # the script refuses the order if it is not theirs
    [owner] = await gateway.hmget(keys.order(order_id), [ORDER_FIELDS["customer_id"]])
    if owner is None:
        raise ProblemError("order_not_found")
    return owner.decode()


# check_order and cancel_order: (gateway, scripts, principal, order id, request id) -> Order
StatusChange = Callable[[RedisGateway, Scripts, Principal, str, str], Awaitable[Order]]


async def check_order(
    gateway: RedisGateway, scripts: Scripts, principal: Principal, order_id: str, request_id: str
) -> Order:
    owner = await _order_owner(gateway, principal, order_id)
    args: list[str | bytes | int] = [
        owner,
        principal.customer_id or "",
        int(time.time() * 1000),
        request_id,
    ]
    result = await in_chunk(
        lambda chunk: scripts.run(
            "check_order", check_order_keys(order_id, owner, chunk), [*args, chunk]
        ),
        order_id,
    )
    return order_from_fields(result.payload)


async def in_chunk(run: Callable[[int], Awaitable[ScriptResult]], order_id: str) -> ScriptResult:
    """A status change run with its keys for the chunk the order id says, and once more
    for the chunk the script answered if the order is in another (a split saga's commit
    after a stale hint: the hash says which). An order's chunk never changes after."""
    try:
        return await run(chunk_of(order_id))
    except ProblemError as error:
        if error.code != "order_chunk_moved":
            raise
        return await run(error.extra["chunk"])


# cancel_order.lua's answer when a phone partition still holds the order's reservation:
# nothing was written, and the split saga cancels it (app/orders/saga_service.py).
RESERVATION_HELD = 307


async def cancel_on_one_node(
    scripts: Scripts,
    principal: Principal,
    order_id: str,
    owner_id: str,
    items_field: str,
    request_id: str,
) -> Order | None:
    """The saga's cancel collapsed: cancel_order.lua (refund and restock in one script)
    where one node serves the order's partition and every phone's; NotOnOneNode, with
    nothing written, where not. None, with nothing written, while a phone partition
    still holds the order's reservation. The keys come from the order's owner and items
    as the caller read them; the script proves they are still the order's before it
    writes."""
    args: list[str | bytes | int] = [
        owner_id,
        principal.customer_id or "",
        int(time.time() * 1000),
        request_id,
        items_field,
        BALANCE_LIMIT,
        STOCK_LIMIT,
    ]
    result = await in_chunk(
        lambda chunk: scripts.run(
            "cancel_order",
            cancel_order_keys(order_id, owner_id, items_field, chunk),
            [*args, chunk],
            one_node=True,
        ),
        order_id,
    )
    if result.status == RESERVATION_HELD:
        return None
    return order_from_fields(result.payload)


async def list_orders(
    gateway: RedisGateway, page: Page, *, customer_id: str | None, status: str | None
) -> tuple[int, list[Order]]:
    """Newest first. Orders are indexed by status only (every order is in exactly one),
    so a list without a status merges the status indexes: a customer's, all in its
    partition's slot, in one script (app/slot_paging.py), or by rank when one status
    is asked; the admin's, every partition's, each through its chunks
    (app/status_lists.py, merged by app/paging.py). Either way the cost does
    not grow with the number of orders."""
    statuses = ORDER_STATUSES if status is None else (status,)
    if customer_id is None:
        # Partition-major, so a tie across partitions is still broken by partition. Each
        # is read through its chunks (app/status_lists.py).
        lists = StatusLists([(p, s) for p in range(PARTITIONS) for s in statuses])
        total, members = await merged_lists_page(
            gateway, lists, (page.page - 1) * page.per_page, page.per_page, newest_first=True
        )
        rows = await rows_of(gateway, members, keys.order, "id") if members else []
        return total, [order_from_hash(row["id"], row) for row in rows]
    indexes = [keys.customer_orders_by_status(customer_id, s) for s in statuses]
    if len(indexes) > 1:
        total, rows = await slot_merged_page_of_hashes(
            gateway, indexes, page, keys.order, id_field="id"
        )
    else:
        total, rows = await page_of_hashes(
            gateway, indexes[0], page, keys.order, newest_first=True, id_field="id"
        )
    return total, [order_from_hash(row["id"], row) for row in rows]
