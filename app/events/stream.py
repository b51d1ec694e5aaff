"""The partitions' event streams as the WebSocket sees them: event ids, the order
events clients are sent, and whether a resume point still has everything after it.

Every partition P has its stream ``e{P}`` (app/keys.py), whose entry ids
(app/vocabulary.py's StreamId) are its own. An event's id names its partition:
``<partition>.<ms>-<seq>``. A socket keeps a cursor per partition it may see (a
customer's: its one partition; the admin's: all 128), and a resume point
(``last_id``) is such a cursor: ``<p>.<ms>-<seq>`` for each partition, joined by
commas (a partition not named is read from its start), or one plain ``<ms>-<seq>``
meaning that id in every partition the socket sees.

Only the order events (vocabulary.ORDER_EVENT_TYPES) reach clients; other
entries of the streams (mail.requeued, ...) are read past silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from app import keys
from app.partitions import PARTITIONS
from app.vocabulary import ORDER_EVENT_TYPES, PartitionEntryId, StreamId

ZERO = StreamId(0, 0)
# The stream key (str or bytes, as a client answers it) -> its partition.
PARTITION_OF_STREAM: dict[str | bytes, int] = {}
for _p in range(PARTITIONS):
    PARTITION_OF_STREAM[keys.events(_p)] = _p
    PARTITION_OF_STREAM[keys.events(_p).encode()] = _p

Cursor = dict[int, StreamId]


def format_cursor(cursor: Cursor) -> str:
    """A resume point: every partition's position but those at the start (0-0, which
    a partition not named means anyway); all at the start: the plain ``0-0``."""
    text = ",".join(f"{p}.{at}" for p, at in sorted(cursor.items()) if at > ZERO)
    return text or str(ZERO)


def parse_last_id(raw: str) -> Cursor | StreamId | None:
    """``last_id``: a plain stream id (for every partition), or one ``<p>.<id>`` per
    partition, joined by commas, each partition at most once. None: malformed."""
    plain = StreamId.parse(raw)
    if plain is not None:
        return plain
    cursor: Cursor = {}
    for part in raw.split(","):
        parsed = PartitionEntryId.parse(part)
        if parsed is None or parsed.partition in cursor:
            return None
        cursor[parsed.partition] = parsed.entry
    return cursor


@dataclass(frozen=True, slots=True)
class OrderEvent:
    """One order event, encoded once and sent as is to every client that may see it."""

    partition: int
    id: StreamId
    customer_id: str
    payload: bytes  # the JSON text frame


_TEXT = ("order_id", "customer_id", "status", "request_id")


def decode_entry(partition: int, entry_id: bytes, fields: dict[bytes, bytes]) -> OrderEvent | None:
    """The client-facing event of an entry of ``partition``'s stream, or None when it is
    not an order event."""
    stream_id = StreamId.parse(entry_id)
    kind = fields.get(b"type", b"").decode("utf-8", "replace")
    if stream_id is None or kind not in ORDER_EVENT_TYPES:
        return None
    text = {name: fields.get(name.encode(), b"").decode("utf-8", "replace") for name in _TEXT}
    raw_at = fields.get(b"at", b"")
    at = int(raw_at) if raw_at.isdigit() and len(raw_at) <= 18 else None
    message = {"type": kind, "id": f"{partition}.{stream_id}", **text, "at": at}
    return OrderEvent(partition, stream_id, text["customer_id"], msgspec.json.encode(message))


@dataclass(frozen=True, slots=True)
class StreamState:
    """What XINFO STREAM says about the stream, reduced to what resuming needs."""

    exists: bool
    length: int = 0
    first_id: StreamId | None = None
    last_generated: StreamId = ZERO
    max_deleted: StreamId = ZERO
    # Entries ever added; None on a Redis older than 7.0, which does not say.
    entries_added: int | None = None

    @classmethod
    def from_xinfo(cls, info: dict[str, Any] | Exception) -> StreamState:
        """From redis-py's parsed XINFO STREAM reply, or the error a missing key gives."""
        if isinstance(info, Exception):
            if "no such key" in str(info).lower():
                return cls(exists=False)
            raise info
        first = info.get("first-entry")
        return cls(
            exists=True,
            length=int(info.get("length", 0)),
            first_id=StreamId.parse(first[0]) if first else None,
            last_generated=_id_or_zero(info.get("last-generated-id")),
            max_deleted=_id_or_zero(info.get("max-deleted-entry-id")),
            entries_added=(
                int(info["entries-added"]) if info.get("entries-added") is not None else None
            ),
        )

    def unknown(self, last_id: StreamId) -> bool:
        """``last_id`` is not from this stream: newer than anything it generated, or
        the stream is gone altogether (deleted, or a fresh Redis)."""
        if not self.exists:
            return last_id > ZERO
        return last_id > self.last_generated

    def lost_after(self, last_id: StreamId) -> bool:
        """Entries after ``last_id`` may have been removed (trimmed or deleted).

        XDEL records the highest id it removed (max-deleted-entry-id); XTRIM only
        ever removes from the front, so a trim can only have taken entries after
        ``last_id`` when ``last_id`` is older than the first entry still held.
        When that is so and anything was ever removed we cannot tell whether
        those entries were after ``last_id``: we say so (a spurious resync costs
        a reload; a silent gap would be wrong).
        """
        if self.max_deleted > last_id:
            return True
        if self.entries_added is not None and self.entries_added <= self.length:
            return False  # nothing was ever removed
        if self.first_id is None:  # empty now: everything up to last_generated went
            return self.last_generated > last_id
        return self.first_id > last_id


def _id_or_zero(value: Any) -> StreamId:
    if value is None:
        return ZERO
    return StreamId.parse(value) or ZERO


def resync_message(
    reason: str, partition: int, last_id: StreamId, state: StreamState, detail: str
) -> bytes:
    """Events of ``partition`` after ``last_id`` may be gone (or, for unknown_id, the id
    is not from its stream)."""
    return msgspec.json.encode(
        {
            "type": "resync",
            "reason": reason,
            "partition": partition,
            "last_id": f"{partition}.{last_id}",
            "first_id": f"{partition}.{state.first_id}" if state.first_id else None,
            "detail": detail,
        }
    )


def live_message(cursor: Cursor, replayed: int) -> bytes:
    return msgspec.json.encode(
        {"type": "live", "last_id": format_cursor(cursor), "replayed": replayed}
    )
