"""Dead-lettered confirmation mails: list them, and requeue one.

The mail worker (``mail/worker.py``) moves a mail to its order's partition's
dead-letter stream ``md{P}`` after a 5xx reply or MAIL_MAX_ATTEMPTS temporary
failures. A dead letter's id names its partition: ``<partition>.<ms>-<seq>``
(app/vocabulary.py: PartitionEntryId). The list merges the 128 partitions' streams,
newest first (dead letters are few: each page reads up to page x per_page
entries of each partition). Requeueing appends a fresh ``mail.requeued`` entry
for the order to the partition's ``e{P}``, resets the order's attempt counter and
deletes the dead letter, in one script on one partition
(``app/lua/requeue_mail.lua``: the app owns the keys and the scripts; the
mail worker only reads what it appends). The worker then sends it like a new
``order.completed``; if the mail was meanwhile sent after all, the
``mail:sent`` marker stops a second copy.
"""

from __future__ import annotations

import time

import msgspec
from aiohttp import web
from redis.asyncio import Redis

from app import keys
from app.handlers import redis_of
from app.ids import is_valid_id
from app.middlewares import REQUEST_ID
from app.partitions import PARTITIONS, partition_of
from app.problems import ProblemError
from app.query import page_params
from app.responses import json_response
from app.routing import Call
from app.scripts import load_source
from app.timestamps import iso_time
from app.vocabulary import PartitionEntryId, StreamId


class DeadLetter(msgspec.Struct, kw_only=True):
    id: str
    order_id: str
    customer_id: str
    reason: str
    attempts: int
    event_id: str
    event_type: str
    at: str


class DeadLetterPage(msgspec.Struct, kw_only=True):
    dead_letters: list[DeadLetter]
    page: int
    per_page: int
    total: int
    pageCount: int


class Requeued(msgspec.Struct, kw_only=True):
    dead_id: str
    order_id: str
    event_id: str


class RequeuedEnvelope(msgspec.Struct, kw_only=True):
    requeued: Requeued


class DeadLetterNotRequeueable(ValueError):
    """The dead letter names no valid order id, so there is nothing to resend."""


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _dead_letter(partition: int, entry_id: bytes | str, fields: dict) -> DeadLetter:
    f = {_text(k): _text(v) for k, v in fields.items()}
    attempts = f.get("attempts", "0")
    at = f.get("at", "")
    return DeadLetter(
        id=f"{partition}.{_text(entry_id)}",
        order_id=f.get("order_id", ""),
        customer_id=f.get("customer_id", ""),
        reason=f.get("reason", ""),
        attempts=int(attempts) if attempts.isdigit() else 0,
        event_id=f.get("event_id", ""),
        event_type=f.get("event_type", ""),
        at=iso_time(at) if at.isdigit() else "",
    )


async def list_dead_letters(
    redis: Redis, *, page: int = 1, per_page: int = 50
) -> tuple[int, list[DeadLetter]]:
    """(total, one page of dead letters of every partition, newest first)."""
    wanted = page * per_page
    async with redis.pipeline(transaction=False) as pipe:
        for partition in range(PARTITIONS):
            pipe.xlen(keys.mail_dead(partition))
            pipe.xrevrange(keys.mail_dead(partition), "+", "-", count=wanted)
        replies = await pipe.execute()
    total = sum(replies[0::2])
    newest = sorted(
        (
            (StreamId.parse(entry_id) or StreamId(0, 0), partition, entry_id, fields)
            for partition, entries in enumerate(replies[1::2])
            for entry_id, fields in entries
        ),
        key=lambda row: (row[0], row[1]),
        reverse=True,
    )
    start = (page - 1) * per_page
    return total, [_dead_letter(p, i, f) for _, p, i, f in newest[start : start + per_page]]


async def requeue_dead_letter(
    redis: Redis, dead_id: str, *, request_id: str = ""
) -> Requeued | None:
    """Put one dead-lettered mail back to be sent. None when no such dead letter
    exists (any more: a second requeue of the same id finds nothing)."""
    # Redis answers an id past 64 bits with an error, which must be a 404 here, not a 500.
    parsed = PartitionEntryId.parse(dead_id, PARTITIONS)
    if parsed is None:
        return None
    dead = keys.mail_dead(parsed.partition)
    entry_id = str(parsed.entry)
    found = await redis.xrange(dead, entry_id, entry_id)
    if not found:
        return None
    letter = _dead_letter(parsed.partition, *found[0])
    if not is_valid_id(letter.order_id) or partition_of(letter.order_id) != parsed.partition:
        raise DeadLetterNotRequeueable(f"dead letter {dead_id} names no valid order id")
    script = redis.register_script(load_source("requeue_mail"))
    event_id = await script(
        keys=[dead, keys.events(parsed.partition), keys.mail_attempts(letter.order_id)],
        args=[entry_id, letter.order_id, time.time_ns() // 1_000_000, request_id],
    )
    if event_id is None:
        return None
    return Requeued(
        dead_id=dead_id,
        order_id=letter.order_id,
        event_id=f"{parsed.partition}.{_text(event_id)}",
    )


# -- handlers (the routes declare auth="admin") ---------------------------------------------------------


async def get_dead_letters(call: Call[None]) -> web.Response:
    request = call.request
    paging = page_params(request, default_per_page=50)
    total, letters = await list_dead_letters(
        redis_of(request), page=paging.page, per_page=paging.per_page
    )
    return json_response(DeadLetterPage(dead_letters=letters, **paging.counts(total)))


async def retry_dead_letter(call: Call[None]) -> web.Response:
    request, dead_id = call.request, call.id
    try:
        requeued = await requeue_dead_letter(
            redis_of(request), dead_id, request_id=request.get(REQUEST_ID, "")
        )
    except DeadLetterNotRequeueable as error:
        raise ProblemError("validation_error", str(error)) from None
    if requeued is None:
        raise ProblemError("not_found", f"No dead letter with id {dead_id[:64]!r}")
    return json_response(RequeuedEnvelope(requeued=requeued))
