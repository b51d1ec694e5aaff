"""The Idempotency-Key record: what a POST /orders with a key stores so that a retry
is answered as the first request was (docs/data-tier.md, section 10; issue 17).

A record is one field of a bucket hash (app/keys.py: idempotency_bucket) in the
customer's partition, not a key of its own: a key with its own TTL costs about 60
bytes more than the record itself. Each bucket gathers the records of one time window
of ``ttl`` seconds (BUCKETS_PER_TTL = 1) and expires as a whole, ``ttl`` after its
window ends, so a record is kept at least ``ttl`` and at most twice ``ttl``. A lookup
reads the newest bucket and the one before it (OLDER_BUCKETS = 1): every bucket that may
still hold a record made in the last ``ttl``. Windows of ``ttl / 4`` (layout 7) kept
records at most a quarter longer but cost a new key's lookup 5 HGETs instead of 2.

Layout 8 (app/keys.py): bucket keys keep their form (``i{P}<window start>``), only the
window's width changed. A record in a layout-7 bucket (6 hours wide by default) would be
found only when its window's start happened to be a multiple of the new width, so a
retry sent across an upgrade could place a second order. Hence a layout bump rather
than a silent change: app/layout.py refuses layout-7 data.

- field: 16 bytes of sha256 over the customer id and the key, so the key's length and
  characters never shape what is stored, and one customer's key never finds another's;
- value (written and read only by the scripts' prelude, app/lua_prelude.py):
  ``FINGERPRINT_BYTES`` of the request's fingerprint, the HTTP status as 3 digits,
  then for a 201 the order's id only, for a refusal its JSON payload. A replayed
  201 is rebuilt from the order (app/orders/service.py: replayed_order): its fields
  never change but the status, and the status it was created with follows from the
  request (the fingerprint covers ``autocheck``).
"""

from __future__ import annotations

import functools
import hashlib

import msgspec

from app import keys
from app.partitions import partition_of

FIELD_BYTES = 16
# 96 bits tell one request body from another for the same key and customer; a
# collision would replay the first answer to a changed body instead of a 422.
FINGERPRINT_BYTES = 12
BUCKETS_PER_TTL = 1
# Buckets read besides the newest: with windows of ttl, the newest and the one before
# it cover every record younger than ttl.
OLDER_BUCKETS = BUCKETS_PER_TTL


def fingerprint(customer_id: str, lines: list[tuple[str, int]], autocheck: bool) -> bytes:
    """What "the same body" means for an Idempotency-Key: the validated request,
    canonically encoded, hashed."""
    canonical = msgspec.json.encode([customer_id, lines, autocheck])
    return hashlib.sha256(canonical).digest()[:FINGERPRINT_BYTES]


def record_field(customer_id: str, idempotency_key: str) -> bytes:
    return hashlib.sha256(f"{customer_id}:{idempotency_key}".encode()).digest()[:FIELD_BYTES]


def bucket_seconds(ttl_s: int) -> int:
    return -(-ttl_s // BUCKETS_PER_TTL)


class RecordPlace(msgspec.Struct, frozen=True):  # a Struct: one per keyed order (ScriptResult)
    """Where a request's record is looked up and written."""

    # b"" without an Idempotency-Key: the scripts then neither read nor write one.
    field: bytes
    # The bucket a new record goes in (the newest), then the older ones, newest first.
    newest: str
    older: tuple[str, ...]
    # When the newest bucket expires (Unix seconds): its window's end plus the TTL.
    expire_at: int


def record_place(
    customer_id: str, idempotency_key: str | None, ttl_s: int, now_s: int
) -> RecordPlace:
    width = bucket_seconds(ttl_s)
    newest, older, expire_at = _buckets(partition_of(customer_id), now_s - now_s % width, ttl_s)
    return RecordPlace(
        field=b"" if idempotency_key is None else record_field(customer_id, idempotency_key),
        newest=newest,
        older=older,
        expire_at=expire_at,
    )


# Every keyed order of a partition names the same buckets for a whole window (a TTL):
# spelt once per window, not per order (P1, docs/data-tier.md 10.2).
@functools.lru_cache(maxsize=1024)
def _buckets(partition: int, start: int, ttl_s: int) -> tuple[str, tuple[str, ...], int]:
    width = bucket_seconds(ttl_s)
    return (
        keys.idempotency_bucket(partition, start),
        tuple(
            keys.idempotency_bucket(partition, start - back * width)
            for back in range(1, OLDER_BUCKETS + 1)
        ),
        start + width + ttl_s,
    )
