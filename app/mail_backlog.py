"""How far behind the confirmation mails are, read from Redis alone.

The mail worker exports it as metrics (mail/worker.py) and ``make status``
prints it (app/ops/status.py), so it lives on the app side, which both may import.

Summed over the 128 partitions' streams ``e{P}`` (each has its own ``mailer``
group, docs/data-tier.md section 7); each figure is read in one pipelined round
per kind, which a cluster client splits per node.

- ``pending``: entries delivered to the ``mailer`` groups and not acknowledged
  (being sent, or waiting in a retry queue ``mr{P}``);
- ``undelivered``: entries after the group's last-delivered-id. XINFO GROUPS
  says so as ``lag``, but answers nil when it cannot tell (after XDEL of an
  entry past the group's position, XGROUP SETID, and other cases Redis
  documents); then the entries are counted, up to COUNT_LIMIT (``exact`` is
  False when the count stopped there). Never a 0 that means "unknown";
- ``oldest_ms``: the event time (the entry id's milliseconds) of the oldest
  mail not yet accepted by the SMTP server: the oldest pending entry, or the
  first undelivered order.completed / mail.requeued entry. None: none waiting.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app import keys
from app.partitions import PARTITIONS
from app.vocabulary import COMPLETED, STATUSES

# Event types the `mailer` group sends a confirmation for (mail/__init__.py).
ORDER_COMPLETED = STATUSES[COMPLETED].event
MAIL_REQUEUED = "mail.requeued"
MAIL_EVENT_TYPES = frozenset({ORDER_COMPLETED, MAIL_REQUEUED})

# Entries counted when Redis cannot say the lag: bounded work per reading.
COUNT_LIMIT = 10_000
PAGE = 1000
# Undelivered entries looked at for the first mail event.
SCAN_FOR_MAIL = 200


def entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _after(entry_id: str) -> str:
    return f"({entry_id}"


@dataclass(frozen=True)
class MailBacklog:
    pending: int
    undelivered: int
    exact: bool
    oldest_ms: int | None
    retrying: int
    dead: int

    def oldest_age_s(self, now_ms: int) -> float:
        """Seconds the oldest waiting mail has waited (0 when none waits)."""
        return 0.0 if self.oldest_ms is None else max(0.0, (now_ms - self.oldest_ms) / 1000)

    def describe(self, now_ms: int) -> str:
        undelivered = f"{self.undelivered}" if self.exact else f">={self.undelivered}"
        return (
            f"pending={self.pending} lag={undelivered} retry={self.retrying}"
            f" oldest={self.oldest_age_s(now_ms):.1f}s"
        )


async def count_after(
    redis: Redis, stream: str, start_id: str, limit: int = COUNT_LIMIT
) -> tuple[int, bool]:
    """Entries of ``stream`` after ``start_id``, counted up to ``limit``: (count, exact)."""
    count, cursor = 0, start_id
    while True:
        size = min(PAGE, limit - count)
        if size <= 0:  # stopped at the limit: exact only if nothing follows
            return count, not await redis.xrange(stream, _after(cursor), "+", count=1)
        page = await redis.xrange(stream, _after(cursor), "+", count=size)
        count += len(page)
        if len(page) < size:
            return count, True
        cursor = page[-1][0]


def _as_int(reply: object) -> int:
    return reply if isinstance(reply, int) else 0


async def read_mail_backlog(redis: Redis) -> MailBacklog | None:
    """The backlog of the ``mailer`` groups over every partition, or None when no
    partition has its group yet. ``redis`` decodes responses."""
    streams = [keys.events(p) for p in range(PARTITIONS)]
    async with redis.pipeline(transaction=False) as pipe:
        for p in range(PARTITIONS):
            pipe.xinfo_groups(streams[p])
            pipe.zcard(keys.mail_retry(p))
            pipe.xlen(keys.mail_dead(p))
        replies = await pipe.execute(raise_on_error=False)
    found = False
    pending = undelivered = retrying = dead = 0
    exact = True
    with_pending: list[str] = []
    with_lag: list[tuple[str, str]] = []
    for p in range(PARTITIONS):
        groups, retry_count, dead_count = replies[3 * p : 3 * p + 3]
        retrying += _as_int(retry_count)
        dead += _as_int(dead_count)
        if isinstance(groups, ResponseError):  # no stream in this partition yet
            continue
        if isinstance(groups, Exception):
            raise groups
        group = next((g for g in groups if g.get("name") == keys.MAIL_GROUP), None)
        if group is None:
            continue
        found = True
        last = group["last-delivered-id"]
        stream_pending = int(group.get("pending") or 0)
        pending += stream_pending
        if stream_pending:
            with_pending.append(streams[p])
        lag = group.get("lag")
        if lag is None:
            count, counted_exact = await count_after(redis, streams[p], last)
            exact = exact and counted_exact
        else:
            count = int(lag)
        undelivered += count
        if count:
            with_lag.append((streams[p], last))
    if not found:
        return None
    oldest: list[int] = []
    if with_pending or with_lag:
        async with redis.pipeline(transaction=False) as pipe:
            for stream in with_pending:
                pipe.xpending(stream, keys.MAIL_GROUP)
            for stream, last in with_lag:
                pipe.xrange(stream, _after(last), "+", count=SCAN_FOR_MAIL)
            replies = await pipe.execute()
        for summary in replies[: len(with_pending)]:
            if summary.get("min"):
                oldest.append(entry_ms(summary["min"]))
        for waiting in replies[len(with_pending) :]:
            first = next((i for i, f in waiting if f.get("type") in MAIL_EVENT_TYPES), None)
            if first is not None:
                oldest.append(entry_ms(first))
            elif len(waiting) == SCAN_FOR_MAIL:  # a mail event may follow: from the last seen
                oldest.append(entry_ms(waiting[-1][0]))
    return MailBacklog(
        pending=pending,
        undelivered=undelivered,
        exact=exact,
        oldest_ms=min(oldest) if oldest else None,
        retrying=retrying,
        dead=dead,
    )
