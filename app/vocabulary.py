"""The words the parts of PhoneShop share: order statuses and their events,
the order items field, stream entry ids and request ids.

Python reads them from here. The Lua scripts read the statuses, the events and
the items codec from the prelude app/scripts.py puts before every script
(``lua_definitions`` below), so no script spells a status itself.

Adding a status: add it to STATUSES, write the script that moves orders into
it (its ledger fields are ``orders_<status>``, and ``<status>_cents`` and
``<status>_units`` when it keeps the money), and add its route. The audit,
the ``status`` filter, /openapi.json and the WebSocket's event types follow
from this table.

Ids: every id names its partition (app/partitions.py, docs/data-tier.md 2.2);
the functions below say which partition each kind of id is minted in.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from app.ids import is_valid_id
from app.partitions import PARTITIONS, new_chunked_id, new_id, partition_for_email, partition_of

# ---- ids: each carries its partition --------------------------------------------------


def new_customer_id(email: str) -> str:
    """In the partition of the lower-cased email: the email's uniqueness index
    (keys.customer_emails) and the customer are then one partition."""
    return new_id(partition_for_email(email.lower()))


def new_phone_id() -> str:
    """In a random partition: phones (the stock) spread over every partition."""
    return new_id(secrets.randbelow(PARTITIONS))


def new_order_id(customer_id: str, chunk: int) -> str:
    """In its customer's partition, minted before the script runs: the order is
    written with the customer's money in one partition, and GET, check and
    cancel find it from the id alone; for the status chunk ``chunk``, the one the
    minting worker believes current (docs/data-tier.md 10.2: the placing script
    refuses another)."""
    return new_chunked_id(partition_of(customer_id), chunk)


# ---- order statuses -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status:
    name: str
    # The type of the events-stream entry appended when an order enters it.
    event: str
    # The order keeps the customer's money and the phones' units, so the
    # ledger counts them in <name>_cents and <name>_units; otherwise they went back.
    keeps_money: bool
    # No order ever leaves it, so its ledger counts only grow.
    final: bool


OPEN = "open"
COMPLETED = "completed"
CANCELLED = "cancelled"

STATUSES: dict[str, Status] = {
    status.name: status
    for status in (
        Status(OPEN, event="order.placed", keeps_money=True, final=False),
        Status(COMPLETED, event="order.completed", keeps_money=True, final=True),
        Status(CANCELLED, event="order.cancelled", keeps_money=False, final=True),
    )
}
ORDER_STATUSES = tuple(STATUSES)
MONEY_KEEPING_STATUSES = tuple(name for name, s in STATUSES.items() if s.keeps_money)
FINAL_STATUSES = tuple(name for name, s in STATUSES.items() if s.final)
ORDER_EVENT_TYPES = frozenset(status.event for status in STATUSES.values())


# ---- a phone's mode (docs/escrow.md, sections 1 and 5) -----------------------------------
# The phone hash's ``mode`` field: absent for a pool-only phone (every phone until escrow
# stripes it); ``striped``: its pool may grant units to stripes on other primaries;
# ``draining``: a short pool met lent units, so no grant starts and a recall brings every
# stripe's units home (app/orders/recall.py), after which the field goes.

STRIPED = "striped"
DRAINING = "draining"
PHONE_MODES = (STRIPED, DRAINING)


# ---- the order hash's field names --------------------------------------------------------
# As stored in ``o{P}<id>`` (app/keys.py): a letter each, since every byte is paid per
# order (about 40 bytes of names a hash; docs/data-tier.md 10.1). The API, the scripts'
# answers and the events keep the long names; this is the one table between the two, for
# Python (order_fields) and Lua (ORDER_FIELD.<name>, and the prelude's order_map).
ORDER_FIELDS: dict[str, str] = {
    "customer_id": "c",
    "status": "s",
    "items": "i",
    # Written no more (layout 7): derived from the items and the seq (order_fields, the
    # Lua prelude's order_map); read where a hash still has them.
    "total_cents": "t",
    "seq": "q",
    "created_at": "a",
    # Only where it differs from the id's (a split saga's commit after a stale hint keeps
    # its id): the status chunk the order is indexed in (docs/data-tier.md 10.2).
    "chunk": "k",
    # Only on an order sold from a stripe (docs/escrow.md, section 3): "<S>:<epoch>", the
    # stripe host partition and the stripe's epoch it sold at (where a cancel gives the
    # units back).
    "stripe": "v",
}


def stored_order_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Order fields under the long names as the hash stores them (for writers outside
    the scripts: test and load fixtures). An unknown name raises KeyError."""
    return {ORDER_FIELDS[name]: value for name, value in fields.items()}


def order_fields(stored: dict[str, str]) -> dict[str, str]:
    """An order hash as read (stored names) under the long names; a field it lacks is left
    out, and so is any other (such as an ``id`` a caller added). The total and the
    creation time, which the scripts no longer store (docs/data-tier.md 10.2), are derived
    where the hash has the items and the seq: the lines' sum, the seq's millisecond."""
    fields = {name: stored[short] for name, short in ORDER_FIELDS.items() if short in stored}
    if "total_cents" not in fields and "items" in fields:
        lines = decode_items(fields["items"])
        fields["total_cents"] = str(sum(line.quantity * line.unit_price_cents for line in lines))
    if "created_at" not in fields and "seq" in fields:
        fields["created_at"] = str(int(fields["seq"]) // 1000)
    return fields


# ---- an order's stripe mark (docs/escrow.md, sections 2 and 3) --------------------------
# The order hash's ``stripe`` field (ORDER_FIELDS: ``v``) on an order sold from stripes:
# "<host partition>:<epoch>", the stripes' host and the epoch they sold at (a cancel gives
# the units back to the stripe while it is at that epoch, else to the pool).

STRIPE_MARK_SEPARATOR = ":"


def stripe_mark(host: int, epoch: int) -> str:
    return f"{host}{STRIPE_MARK_SEPARATOR}{epoch}"


def parse_stripe_mark(mark: str) -> tuple[int, int]:
    """(host partition, epoch) of an order's stripe mark."""
    host, _, epoch = mark.partition(STRIPE_MARK_SEPARATOR)
    return int(host), int(epoch)


# ---- the order items field --------------------------------------------------------------
# An order hash's ``items``: "phone_id:quantity:unit_price_cents;..." in the
# order of the request's lines, written by place_order.lua and never changed.

ITEM_FIELD_SEPARATOR = ":"
ITEM_LINE_SEPARATOR = ";"


class ItemLine(NamedTuple):
    phone_id: str
    quantity: int
    unit_price_cents: int


def encode_items(lines: Iterable[tuple[str, int, int]]) -> str:
    return ITEM_LINE_SEPARATOR.join(
        f"{phone_id}{ITEM_FIELD_SEPARATOR}{quantity}{ITEM_FIELD_SEPARATOR}{unit_price}"
        for phone_id, quantity, unit_price in lines
    )


def decode_items(text: str) -> list[ItemLine]:
    """The lines of an items field; ValueError when it is not one (its phone
    ids name Redis keys, so they are checked like any id)."""
    if not text:
        return []
    lines = []
    for entry in text.split(ITEM_LINE_SEPARATOR):
        phone_id, quantity, unit_price = entry.split(ITEM_FIELD_SEPARATOR)
        if not (is_valid_id(phone_id) and quantity.isdigit() and unit_price.isdigit()):
            raise ValueError(f"not an order line: {entry!r}")
        lines.append(ItemLine(phone_id, int(quantity), int(unit_price)))
    return lines


# ---- a grant's reservation (docs/escrow.md, section 4) -------------------------------------
# A grant (a refill of a stripe) is a reservation on the phone's partition under a grant id
# minted in the stripe's host partition: ``rv{Q}[G] = "g <host> <gen> " + its lines``, the
# lines an items field as above (one line: the phone, the units, the unit price). The
# ``g`` head is what the settler and settle_reservation tell a grant from an order by.

GRANT_MARK = "g"


class GrantReservation(NamedTuple):
    host: int
    # The phone's price generation the grant read with its price.
    gen: int
    lines: str


def encode_grant(host: int, gen: int, lines: str) -> str:
    return f"{GRANT_MARK} {host} {gen} {lines}"


def decode_grant(stored: str) -> GrantReservation | None:
    """A grant's reservation as stored, or None for an order's (its lines alone)."""
    if not stored.startswith(GRANT_MARK + " "):
        return None
    _, host, gen, lines = stored.split(" ", 3)
    return GrantReservation(int(host), int(gen), lines)


def reserved_lines(stored: str) -> str:
    """The items-field lines of a reservation as stored, an order's or a grant's."""
    grant = decode_grant(stored)
    return stored if grant is None else grant.lines


# ---- a recall's shipments (docs/escrow.md, section 5) ------------------------------------
# A closed stripe's units on their way home: sx{S}[shipment id] = the shipment, and the id
# in the pool's take-back set rr{Q} once received. The id names the phone (sx{S} holds
# every phone's), the host and the stripe's epoch at the close; an order id (rr{Q}'s other
# members) never holds the separator. A grant in flight is "<host>:<grant id>" in sg{Q}X.

SHIPMENT_SEPARATOR = ":"


def shipment_id(phone_id: str, host: int, epoch: int) -> str:
    return SHIPMENT_SEPARATOR.join((phone_id, str(host), str(epoch)))


def shipment_phone(shipment: str) -> str:
    """The phone id a shipment id (or a shipment) begins with."""
    return shipment.split(SHIPMENT_SEPARATOR, 1)[0]


class Shipment(NamedTuple):
    phone_id: str
    units: int
    sold: int
    epoch: int


def decode_shipment(shipment: bytes | str) -> Shipment:
    """A shipment as stored in sx{S}: "<phone id>:<units>:<sold>:<epoch>"."""
    if isinstance(shipment, bytes):
        shipment = shipment.decode()
    phone_id, units, sold, epoch = shipment.rsplit(SHIPMENT_SEPARATOR, 3)
    return Shipment(phone_id, int(units), int(sold), int(epoch))


def grant_in_flight(host: int, grant_id: str) -> str:
    return f"{host}{SHIPMENT_SEPARATOR}{grant_id}"


def decode_grant_in_flight(entry: str) -> tuple[int, str]:
    host, _, grant_id = entry.partition(SHIPMENT_SEPARATOR)
    return int(host), grant_id


# ---- stream entry ids -------------------------------------------------------------------
# "<ms>-<seq>", two unsigned 64-bit integers. Redis answers a bigger one with an
# error, so a caller's id is checked before it reaches a command.

STREAM_ID_PATTERN = r"^[0-9]{1,20}-[0-9]{1,20}$"
_STREAM_ID = re.compile(STREAM_ID_PATTERN)
_U64 = 2**64 - 1


@dataclass(frozen=True, order=True, slots=True)
class StreamId:
    """Ids only grow, so "after" is the tuple comparison of the two integers."""

    ms: int
    seq: int

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"

    @classmethod
    def parse(cls, text: str | bytes) -> StreamId | None:
        """``<ms>-<seq>`` with both parts within 64 bits, else None."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        if _STREAM_ID.fullmatch(text) is None:
            return None
        ms, seq = (int(part) for part in text.split("-"))
        if ms > _U64 or seq > _U64:
            return None
        return cls(ms, seq)


# ---- ids of entries of a partition's stream ------------------------------------------
# Each partition has its own streams (app/keys.py: events, mail_dead), whose entry ids
# may repeat across partitions; an id a client sees names its partition:
# "<partition>.<ms>-<seq>".

PARTITION_ENTRY_ID_PATTERN = r"^[0-9]{1,3}\.[0-9]{1,20}-[0-9]{1,20}$"


@dataclass(frozen=True, slots=True)
class PartitionEntryId:
    partition: int
    entry: StreamId

    def __str__(self) -> str:
        return f"{self.partition}.{self.entry}"

    @classmethod
    def parse(cls, text: str | bytes, partitions: int = PARTITIONS) -> PartitionEntryId | None:
        """``<partition>.<ms>-<seq>`` with a partition below ``partitions``, else None."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        head, dot, tail = text.partition(".")
        if not dot or not head.isdigit() or len(head) > 3 or not head.isascii():
            return None
        partition = int(head)
        entry = StreamId.parse(tail)
        if entry is None or partition >= partitions:
            return None
        return cls(partition, entry)


# ---- request ids ------------------------------------------------------------------------
# A client's X-Request-ID is kept when it matches (nginx's map in
# nginx/nginx.conf.template uses the same pattern), and the order scripts carry
# it into the events, where the mail worker logs it again.

REQUEST_ID_PATTERN = r"[A-Za-z0-9._-]{1,128}"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)


def is_request_id(value: str) -> bool:
    return _REQUEST_ID.fullmatch(value) is not None


# ---- the same words for the Lua scripts -------------------------------------------------


def _lua_table(mapping: dict[str, str]) -> str:
    return "{" + ", ".join(f"{key} = '{value}'" for key, value in mapping.items()) + "}"


def lua_definitions() -> dict[str, str]:
    """Lua statements (no comments, no newlines) by the name each defines:
    STATUS.<name>, ORDER_EVENT.<status name>, ORDER_FIELD.<long name> (the order
    hash's stored field name) and PHONE_MODE.<mode>, which raise on an unknown name;
    encode_item(phone_id, quantity, unit_price) and encode_items(list of those);
    decode_items(items): an iterator of phone_id, quantity, unit_price (strings);
    stripe_mark(host, epoch): an order's stripe mark (the ``stripe`` field);
    encode_grant(host, gen, lines) and decode_grant(stored): a grant's reservation
    (nil for an order's; else host, gen, lines as strings)."""
    field, line = ITEM_FIELD_SEPARATOR, ITEM_LINE_SEPARATOR
    strict = "strict_names"
    return {
        strict: f"local {strict} = {{__index = function(_, name)"
        " error('unknown name ' .. tostring(name)) end}",
        "STATUS": "local STATUS = setmetatable("
        f"{_lua_table({name: name for name in STATUSES})}, {strict})",
        "ORDER_EVENT": "local ORDER_EVENT = setmetatable("
        f"{_lua_table({name: s.event for name, s in STATUSES.items()})}, {strict})",
        "ORDER_FIELD": f"local ORDER_FIELD = setmetatable({_lua_table(ORDER_FIELDS)}, {strict})",
        "PHONE_MODE": "local PHONE_MODE = setmetatable("
        f"{_lua_table({name: name for name in PHONE_MODES})}, {strict})",
        "stripe_mark": "local function stripe_mark(host, epoch)"
        f" return host .. '{STRIPE_MARK_SEPARATOR}' .. epoch end",
        "encode_item": "local function encode_item(phone_id, quantity, unit_price)"
        f" return phone_id .. '{field}' .. quantity .. '{field}' .. unit_price end",
        "encode_items": "local function encode_items(lines)"
        f" return table.concat(lines, '{line}') end",
        "decode_items": "local function decode_items(items)"
        f" return string.gmatch(items, '([^{field}{line}]+){field}(%d+){field}(%d+)') end",
        "encode_grant": "local function encode_grant(host, gen, lines)"
        f" return '{GRANT_MARK} ' .. host .. ' ' .. gen .. ' ' .. lines end",
        "shipment_id": "local function shipment_id(phone_id, host, epoch)"
        f" return phone_id .. '{SHIPMENT_SEPARATOR}' .. host .. '{SHIPMENT_SEPARATOR}' .. epoch end",
        "encode_shipment": "local function encode_shipment(phone_id, units, sold, epoch)"
        f" return phone_id .. '{SHIPMENT_SEPARATOR}' .. units .. '{SHIPMENT_SEPARATOR}' .. sold"
        f" .. '{SHIPMENT_SEPARATOR}' .. epoch end",
        "decode_shipment": "local function decode_shipment(shipment)"
        f" return string.match(shipment, '^(.+){SHIPMENT_SEPARATOR}(%d+){SHIPMENT_SEPARATOR}(%d+)"
        f"{SHIPMENT_SEPARATOR}(%d+)$') end",
        "grant_in_flight": "local function grant_in_flight(host, grant_id)"
        f" return host .. '{SHIPMENT_SEPARATOR}' .. grant_id end",
        "decode_grant": "local function decode_grant(stored)"
        f" return string.match(stored, '^{GRANT_MARK} (%d+) (%d+) (.*)$') end",
    }
