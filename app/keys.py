"""Every Redis key name PhoneShop uses, and nothing else builds key strings.

Ids reach these functions only after ``app.ids`` checked them against a strict
pattern, so no caller-controlled text can widen or collide a key.

A single Redis node holds everything today; all keys of one order operation
(customer, phones, indexes, events) are passed to its script through KEYS, so a
move to Redis Cluster only needs a hash tag added here.

Hashes and their fields (all numbers are integers, money in cents):

``phone:{id}``      id, name, description, image_url, price_cents, stock,
                    added_units (created + restocked, ever), seq, created_at
``customer:{id}``   id, name, surname, email, balance_cents,
                    added_cents (initial balance + deposits, ever),
                    token_sha256, seq, created_at
``order:{id}``      id, customer_id, status (app/vocabulary.py: STATUSES),
                    items ("phone_id:quantity:unit_price_cents;...",
                    app/vocabulary.py: encode_items, decode_items),
                    total_cents, seq, created_at, request_id

Hash ``ledger``: the shop's running totals, moved by the same script and in
the same step as the rows they sum, so they are one consistent figure at every
moment (app/admin/audit.py checks them against a paged recount of the rows).
Money in cents: balance_cents (all balances), added_cents (all opening
balances + deposits), open_cents and completed_cents (the totals of open and
of completed orders). Units: stock_units, added_units, open_units,
completed_units. Counts: phones, customers, orders_open, orders_completed,
orders_cancelled. (So orders_<status> for every status, and <status>_cents and
<status>_units for each that keeps the money: app/vocabulary.py.) changes: one more for every script run that wrote, so an
unchanged count means nothing moved. At every moment
balance + open + completed = added, in cents and in units. Every order script
touches it, so a move to Redis Cluster would keep one ledger per hash tag.

Stream ``events``: one entry per order change, appended by the script that made
the change. Fields: type (the event of the order's new status, app/vocabulary.py),
order_id, customer_id, status, request_id, at (ms since the epoch);
order.completed also carries balance_cents, the customer's balance at that
moment (for the mail). ``mail.requeued`` entries (app/admin/mail.py) put a
dead-lettered mail back: status=completed plus dead_id.
"""

from __future__ import annotations

import hashlib

from app import partitions

# Sorted sets scored by a creation sequence number: stable pagination with
# ZRANGE by rank, O(log N + page) whatever the size.
PHONES = "phones"
PHONES_SEQ = "phones:seq"
CUSTOMERS = "customers"
CUSTOMERS_SEQ = "customers:seq"
CUSTOMER_EMAILS = "customers:email"  # hash: lower-cased email -> customer id
ORDERS = "orders"
ORDERS_SEQ = "orders:seq"

EVENTS = "events"
MAIL_GROUP = "mailer"
MAIL_DEAD = "mail:dead"

LEDGER = "ledger"


def phone(phone_id: str) -> str:
    return f"phone:{phone_id}"


def customer(customer_id: str) -> str:
    return f"customer:{customer_id}"


def customer_token(token_sha256: str) -> str:
    """String key: sha256 of a customer's bearer token -> customer id."""
    return f"token:{token_sha256}"


def order(order_id: str) -> str:
    return f"order:{order_id}"


def orders_by_status(status: str) -> str:
    return f"orders:status:{status}"


def customer_orders(customer_id: str) -> str:
    return f"customer:{customer_id}:orders"


def customer_orders_by_status(customer_id: str, status: str) -> str:
    return f"customer:{customer_id}:orders:{status}"


def idempotency(customer_id: str, idempotency_key: str) -> str:
    """Hash storing the first answer to an Idempotency-Key, per customer.

    The client's key is hashed so its length and characters never shape a key.
    """
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
    return f"idem:{customer_id}:{digest}"


def mail_sent(order_id: str) -> str:
    """Set once the SMTP server accepted an order's confirmation mail."""
    return f"mail:sent:{order_id}"


def mail_attempts(order_id: str) -> str:
    return f"mail:attempts:{order_id}"


def mail_worker_alive(worker_name: str) -> str:
    return f"mail:worker:{worker_name}:alive"


# Mail worker (mail/worker.py). Stream entry ids of mails waiting for their
# next attempt after a temporary failure, scored by when that attempt is due
# (ms since the epoch). The entries stay pending in the `mailer` group, so the
# stream is never trimmed past them.
MAIL_RETRY = "mail:retry"


def write_ack(key: str) -> str:
    """A string in ``key``'s slot that app/cluster_gateway.py writes (with an expiry)
    to prove, with WAIT on the same connection, that a script's write on that slot
    reached the replica. Its hash tag is ``key``'s own, or ``key`` itself when it has
    none, so it lands in the same slot either way (Redis hashes only the first
    non-empty ``{...}``)."""
    start = key.find("{")
    if start < 0:
        return f"ack{{{key}}}"
    end = key.find("}", start + 1)
    if end > start + 1:
        return f"ack{{{key[start + 1 : end]}}}"
    raise ValueError(f"{key!r} has a brace but no hash tag: no ack key shares its slot")


# ---- the reservation saga (docs/data-tier.md, sections 2.3, 3 and 11) -----------------
# Each is one partition's key: ``{tag}`` puts it in that partition's one cluster slot,
# with the phone (or order) hashes its scripts touch beside it. Arguments are partition
# numbers (app.partitions.partition_of of a phone or order id).


def _in_partition(prefix: str, partition: int) -> str:
    return f"{prefix}{{{partitions.tag(partition)}}}"


def reservations(partition: int) -> str:
    """Hash: order id -> the lines a phone partition holds for it, with unit prices."""
    return _in_partition("rv", partition)


def reservations_due(partition: int) -> str:
    """Zset: order id by reservation expiry (ms), the settler's work list."""
    return _in_partition("rd", partition)


def releases(partition: int) -> str:
    """Hash: order id -> "released", the tombstone that refuses a late reserve."""
    return _in_partition("rx", partition)


def aborts(partition: int) -> str:
    """Hash on the order's partition: order id -> the abort marker, the saga's fence."""
    return _in_partition("ab", partition)


def take_backs_due(partition: int) -> str:
    """Zset on the order's partition: cancelled order id by when its stock is due back."""
    return _in_partition("ro", partition)


def taken_back(partition: int) -> str:
    """Set on a phone partition: order ids whose stock it already took back."""
    return _in_partition("rr", partition)


def settler_lease(partition: int) -> str:
    """String: the web worker sweeping this partition's due work (SET NX PX)."""
    return _in_partition("lease", partition)


def partition_ledger(partition: int) -> str:
    """Hash: one partition's running totals (section 2.3's lg{P}); the saga's scripts move
    a phone partition's stock_units, held_units and sold_units in it."""
    return _in_partition("lg", partition)
