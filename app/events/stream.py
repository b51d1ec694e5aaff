"""The ``events`` stream as the WebSocket sees it: entry ids (app/vocabulary.py's
StreamId), the order events clients are sent, and whether a resume point still
has everything after it.

Only the order events (vocabulary.ORDER_EVENT_TYPES) reach clients; other
entries of the stream (mail.requeued, ...) are read past silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from app.vocabulary import ORDER_EVENT_TYPES, StreamId

ZERO = StreamId(0, 0)


@dataclass(frozen=True, slots=True)
class OrderEvent:
    """One order event, encoded once and sent as is to every client that may see it."""

    id: StreamId
    customer_id: str
    payload: bytes  # the JSON text frame


_TEXT = ("order_id", "customer_id", "status", "request_id")


def decode_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> OrderEvent | None:
    """The client-facing event of a stream entry, or None when it is not an order event."""
    stream_id = StreamId.parse(entry_id)
    kind = fields.get(b"type", b"").decode("utf-8", "replace")
    if stream_id is None or kind not in ORDER_EVENT_TYPES:
        return None
    text = {name: fields.get(name.encode(), b"").decode("utf-8", "replace") for name in _TEXT}
    raw_at = fields.get(b"at", b"")
    at = int(raw_at) if raw_at.isdigit() and len(raw_at) <= 18 else None
    message = {"type": kind, "id": str(stream_id), **text, "at": at}
    return OrderEvent(stream_id, text["customer_id"], msgspec.json.encode(message))


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


def resync_message(reason: str, last_id: StreamId, state: StreamState, detail: str) -> bytes:
    return msgspec.json.encode(
        {
            "type": "resync",
            "reason": reason,
            "last_id": str(last_id),
            "first_id": str(state.first_id) if state.first_id else None,
            "detail": detail,
        }
    )


def live_message(last_id: StreamId | None, replayed: int) -> bytes:
    return msgspec.json.encode(
        {"type": "live", "last_id": None if last_id is None else str(last_id), "replayed": replayed}
    )
