"""The mail worker: consumer group ``mailer`` on each partition's events stream.

Every partition P has its stream ``e{P}`` (docs/data-tier.md section 7), and the
worker has the group ``mailer`` on each (created with MKSTREAM at start). An
entry's mail keys (``ms{P}``/``ma{P}`` of its order, the retry queue ``mr{P}``,
the dead letters ``md{P}``) are in the same partition, so every MULTI and script
below touches one slot on a Redis Cluster. Entry ids are per stream: the worker
keeps each entry's partition with it. A chunk may hold entries of several
partitions; every script and MULTI on it touches one partition.

One loop feeds MAIL_CONCURRENCY lanes (``Lanes``, mail/smtp.py), each an SMTP session
(``SmtpSender``) sending one mail at a time, a chunk of up to CHUNK after another.
Several workers share the work through the consumer group. The loop:

1. refresh the health key ``mail:worker:{name}:alive`` (log a line now and then);
2. every EVENTS_TRIM_INTERVAL_SECONDS, trim each stream by MINID, never past an
   entry the group has not acknowledged (``mail/lua/trim_events.lua``);
3. close SMTP sessions idle for MAIL_IDLE_TIMEOUT_SECONDS;
4. take the mails whose retry is due from the partitions' ``mr{P}`` zsets (ZREM
   decides which worker gets one), XCLAIM them and hand them to free lanes. The
   128 queues' heads are looked at once a second (one pipelined round), and
   sooner when a retry this worker scheduled is due;
5. every MAIL_CLAIM_IDLE_SECONDS / 4, XAUTOCLAIM entries idle past
   MAIL_CLAIM_IDLE_SECONDS: a crashed worker's mail is taken over;
6. once a lane is free, XREADGROUP at most a chunk of each stream (COUNT is per
   stream), in chunks of up to CHUNK mails of any partitions (``_read_new``,
   ``_handle_entries``; the other events are acknowledged in one round trip).
   While mails come at 100/s or more, a read first waits, after the one before,
   until about a chunk has come (at most 20 ms: the read window); slower, it is
   made at once, so a lone mail goes out at once. On one redis-server that is one
   XREADGROUP over the 128 streams (on a hiredis connection of its own), blocking
   at most until the next retry is due: Redis wakes it when any stream gets an
   entry. On a cluster, where one
   command cannot span slots, each stream is read without blocking (pipelined,
   a round trip per node) when the doorbell (app/stream_doorbell.py: keyspace
   notifications of XADD on every primary) names it, and every stream once a
   second (the sweep: the backstop for a lost notification, or a cluster where
   CONFIG SET is refused).

Per chunk, on its lane (the Redis work: mail/batch_redis.py, over one
multiplexed connection, so the lanes' commands of one event-loop turn share a
write):

- one round trip: every ``ms{P}<order id>`` sent marker and order hash. A mail
  already marked -> XACK, nothing sent (a redelivery);
- the order, customer or address is unusable -> dead letter at once;
- one round trip: the customers and phone names and ``hold_entries.lua``: each
  entry is still pending for this worker (else skip it: another took it over),
  its idle time is reset and ``ma{P}<order id>`` counted. Only the
  renders (tens of microseconds each) follow before the first send, and each
  send must end within MAIL_CLAIM_IDLE_SECONDS / 2 of the hold; once a quarter
  of it has passed (a slow relay), the rest of the chunk is held again, so no
  other worker can take an entry over while it is being sent;
- send with the stable Message-ID ``<order-{id}@{MAIL_DOMAIN}>``;
- accepted -> MULTI: SET the marker NX, DEL attempts, XACK, ZREM retry, before
  the next mail of the lane is sent (a crash re-sends at most the mail in hand).
  A MULTI Redis refuses (a cluster failover: the primary gone, then its heir
  refusing writes until its own replica is back) is tried again on the lane until
  Redis takes it or the worker stops; meanwhile this worker sends that order's
  mail on no other lane (``_accepted_unrecorded``), so a takeover of its entry
  records it instead of sending it again;
- 5xx -> MULTI: XADD ``md{P}``, XACK, ZREM retry, DEL attempts. Never retried;
- a throttle (421, 451, 452, a connection refused at connect or greeting) ->
  ZADD ``mr{P}`` and take the attempt back: a relay saying "later" never
  makes a dead letter. The lane backs off (exponential, with jitter) and the rest
  of its chunk goes back to the retry queue, due at once, for the other lanes;
  a refused connection also lowers the sessions used (``Lanes``);
- another 4xx, a timeout, a dropped connection -> ZADD ``mr{P}`` with a
  due time (exponential backoff with jitter); at MAIL_MAX_ATTEMPTS it is
  dead-lettered instead.

A retried entry stays pending in the group, so nothing is lost and the stream
is not trimmed past it. Any other event type is XACKed without a mail. An entry
is XACKed only after its mail was accepted, was already marked sent, or was
dead-lettered.

SMTP sessions: at most MAIL_MAX_PER_CONNECTION mails each (a stock MTA delivers
only the first few of a session at once), EHLO MAIL_HELO_NAME.

Delivery is at least once: a crash (or a stop) between the server's 250 and the
marker, a Redis outage longer than MAIL_CLAIM_IDLE_SECONDS with another worker
taking the entry over, or a server that drops the connection after the data, sends
the mail again, with the same Message-ID, so the receiving side can deduplicate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from typing import TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from app import keys
from app.ids import is_valid_id
from app.logs import request_id_var
from app.mail_backlog import entry_ms, read_mail_backlog
from app.partitions import PARTITIONS, partition_of
from app.redis_clients import closed_under_the_call, redis_client
from app.stream_doorbell import Doorbell
from app.vocabulary import decode_items, is_request_id, order_fields
from mail import MAIL_EVENT_TYPES, metrics, scripts
from mail.batch_redis import BatchRedis, Loaded
from mail.render import (
    InvalidRecipient,
    MailLine,
    OrderMail,
    RenderedMail,
    UnsafeMessage,
    render_confirmation,
)
from mail.settings import MailSettings
from mail.smtp import Lanes, SmtpSender, classify

log = logging.getLogger("mail.worker")

GROUP = keys.MAIL_GROUP
STREAMS = tuple(keys.events(p) for p in range(PARTITIONS))
PARTITION_OF_STREAM = {stream: p for p, stream in enumerate(STREAMS)}
# On a cluster, every stream is read at least this often (seconds), doorbell or not.
SWEEP_S = 1.0
# The heads of the 128 retry queues are looked at least this often (seconds); a
# retry this worker schedules is also remembered, and looked for when due.
RETRY_PROBE_S = 1.0
# Longest XREADGROUP block: the loop comes round at least this often to
# heartbeat, trim, claim and notice SIGTERM.
MAX_BLOCK_MS = 1000
# The read window: while mails come at least READ_WINDOW_MIN_MAILS per READ_WINDOW_S,
# a read waits after the previous one until about a chunk has come, at most
# READ_WINDOW_S: a read, its acknowledgement of the other events, a chunk's Redis
# round trips and its lane's task then serve several mails instead of one each.
# Slower than that, a read is made as soon as the previous one is done and blocks
# until an entry comes: a lone mail goes out at once.
READ_WINDOW_S = 0.02
READ_WINDOW_MIN_MAILS = 2
MAX_REASON = 500
# An attempt counter outlives any retry schedule, then expires with its mail.
ATTEMPTS_TTL_S = 30 * 86400
# Consumers idle this long with nothing pending are deleted from the group.
PRUNE_IDLE_S = 3600.0
# Idle time given to entries a stopping worker hands back: past any claim timeout.
RELEASED_IDLE_MS = 365 * 86400 * 1000
# Most mails one lane takes at once (sent one after the other on its session):
# the chunk's Redis work is three round trips whatever its size.
CHUNK = 16
# With metrics on, the backlog gauges are refreshed at most this often (seconds).
BACKLOG_INTERVAL = 1.0


T = TypeVar("T")
# A new entry as the worker handles it: (partition, entry id, fields).
Entry = tuple[int, str, dict[str, str]]


def by_partition(pairs: Iterable[tuple[int, T]]) -> dict[int, list[T]]:
    """Items grouped by their partition, in order."""
    groups: dict[int, list[T]] = {}
    for partition, item in pairs:
        groups.setdefault(partition, []).append(item)
    return groups


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def connect_redis(settings: MailSettings) -> Redis:
    """One redis-server, or the cluster when REDIS_CLUSTER_NODES is set (app/redis_clients.py)."""
    return redis_client(  # type: ignore[return-value]
        settings.redis_url,
        settings.redis_cluster_nodes,
        decode_responses=True,
        socket_timeout=MAX_BLOCK_MS / 1000 + 10,
        socket_connect_timeout=5,
        health_check_interval=30,
    )


def clip(reason: str) -> str:
    return " ".join(reason.split())[:MAX_REASON]


class BadEvent(Exception):
    """The event or the data it points at cannot make a mail: dead-letter it."""


@dataclass(frozen=True, slots=True)
class Ready:
    """A mail held, rendered and about to be sent; ``held_at``: loop time of its hold."""

    partition: int
    entry_id: str
    fields: dict[str, str]
    order_id: str
    attempts: int
    rendered: RenderedMail
    held_at: float


@contextmanager
def request_context(fields: dict[str, str]) -> Iterator[None]:
    """Every log line about a mail carries the id of the request that caused its
    event (the order scripts put it in): one grep follows an order from nginx's
    access log to here."""
    request_id = fields.get("request_id", "")
    token = request_id_var.set(request_id if is_request_id(request_id) else None)
    try:
        yield
    finally:
        request_id_var.reset(token)


def parse_order(
    order_id: str, order: dict[str, str]
) -> tuple[str, list[tuple[str, int, int]], int]:
    """(customer id, lines, total) of an order hash as read (its short field names), or
    BadEvent."""
    if not order:
        raise BadEvent(f"order {order_id} not found")
    order = order_fields(order)
    customer_id = order.get("customer_id", "")
    if not is_valid_id(customer_id):
        raise BadEvent(f"order {order_id} has an invalid customer id")
    try:
        lines = decode_items(order.get("items", ""))
        total = int(order["total_cents"])
    except (ValueError, KeyError):
        raise BadEvent(f"order {order_id} is malformed") from None
    return customer_id, lines, total


class MailWorker:
    def __init__(self, settings: MailSettings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.lanes = Lanes(settings, lambda: SmtpSender(settings))
        self.name = settings.worker_name
        self.from_address = settings.from_address
        self.stats: Counter[str] = Counter()
        self._stopping = asyncio.Event()
        self._in_flight: set[asyncio.Task] = set()
        self.batch = BatchRedis(redis, self.name, ATTEMPTS_TTL_S, MAX_BLOCK_MS / 1000 + 10)
        self._trim = redis.register_script(scripts.source("trim_events"))
        self._random = random.Random()
        self._next_trim = 0.0
        self._next_claim = 0.0
        self._next_alive = 0.0
        self._next_log = 0.0
        self._next_backlog = 0.0
        self._next_due_ms: float | None = None
        self._next_retry_probe = 0.0
        self._retry_heads: dict[int, float] = {}  # partition -> its first retry's due ms
        # Orders whose mail the SMTP server accepted and whose record a lane is still
        # trying to write (_record_sent): never sent again by this worker meanwhile.
        self._accepted_unrecorded: set[str] = set()
        self._next_sweep = 0.0
        self._last_read = 0.0  # loop time the last read of new entries returned
        self._mail_rate = 0.0  # new mails a second, a moving average over reads
        # One redis-server: a blocking XREADGROUP over every stream. A cluster: the doorbell.
        self._doorbell = Doorbell(redis) if isinstance(redis, RedisCluster) else None
        self._group_ready = False
        metrics.CONNECTIONS_LIMIT.set(self.lanes.limit)

    # -- lifecycle -------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        """Finish the mails in hand, then leave run()."""
        if not self.stopping:
            log.info("mail worker %s stopping after the mail in hand", self.name)
        self._stopping.set()

    async def _sleep(self, seconds: float) -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def ensure_group(self) -> None:
        """Create the `mailer` group on every partition's stream, from its start
        (MKSTREAM), where it is missing: one pipelined round."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in STREAMS:
                pipe.xgroup_create(stream, GROUP, id="0", mkstream=True)
            replies = await pipe.execute(raise_on_error=False)
        created = 0
        for reply in replies:
            if not isinstance(reply, Exception):
                created += 1
            elif "BUSYGROUP" not in str(reply):
                raise reply
        if created:
            log.info("created consumer group %s on %d partition stream(s)", GROUP, created)

    async def run(self) -> None:
        s = self.settings
        log.info(
            "mail worker %s starting: SMTP %s:%d tls=%s helo=%s, %d session(s) of up to %d"
            " mails, group %s on %d partition streams (%s)",
            self.name,
            s.smtp_host,
            s.smtp_port,
            s.smtp_tls,
            s.ehlo_name,
            s.concurrency,
            s.max_per_connection,
            GROUP,
            len(STREAMS),
            "doorbell and sweep" if self._doorbell is not None else "one blocking read",
        )
        failures = 0
        if self._doorbell is not None:
            self._doorbell.start()
        try:
            while not self.stopping:
                try:
                    if not self._group_ready:
                        await self.ensure_group()
                        self._group_ready = True
                        await self._own_backlog()
                    await self.run_once()
                    failures = 0
                except (RedisError, OSError, RuntimeError, AttributeError) as error:
                    # A connection closed under the call by the cluster client is lost
                    # like any other; anything else of those two types is a bug.
                    redis_error = isinstance(error, (RedisError, OSError))
                    if not redis_error and not closed_under_the_call(error):
                        raise
                    if "NOGROUP" in str(error):  # the stream or group was deleted: recreate
                        self._group_ready = False
                    failures += 1
                    delay = min(5.0, 0.1 * 2**failures)
                    log.warning("redis unavailable (%s); retrying in %.1fs", error, delay)
                    await self._sleep(delay)
        finally:
            if self._doorbell is not None:
                await self._doorbell.stop()
            if self._in_flight:
                await asyncio.gather(*self._in_flight, return_exceptions=True)
            await self.lanes.close()
            await self.batch.aclose()
            with suppress(RedisError, OSError):
                await self.redis.delete(keys.mail_worker_alive(self.name))
            log.info("mail worker %s stopped: %s", self.name, self._stats_line())

    async def run_once(self) -> None:
        """One pass of the loop (see the module docstring)."""
        loop = asyncio.get_running_loop()
        await self._heartbeat()
        if loop.time() >= self._next_trim:
            await self.trim_events()
            await self.prune_consumers()
            self._next_trim = loop.time() + self.settings.trim_interval
        self.lanes.close_idle(time.monotonic(), self.settings.idle_timeout)
        took_retries = await self._due_retries()
        if self.stopping:
            return
        if loop.time() >= self._next_claim:
            await self._reclaim_idle()
            self._next_claim = loop.time() + max(0.05, self.settings.claim_idle / 4)
        if self.stopping:
            return
        # Read about a chunk for each free lane (and one more): an entry read is
        # an entry this worker holds, and the other workers should get theirs.
        if not await self.lanes.wait_free(MAX_BLOCK_MS / 1000):
            return
        # After due retries, look for new entries without waiting: more retries may be due.
        block = None if took_retries else self._block_ms()
        count = min(self.settings.batch_size, CHUNK * (self.lanes.free + 1))
        window = self._read_window(loop.time())
        if window > 0:
            await asyncio.sleep(window)  # batching at a high rate, not synchronising
            if self.stopping:
                return
        found = await self._read_new(count, block)
        mails = sum(
            1 for _, entries in found for _, f in entries if f and f.get("type") in MAIL_EVENT_TYPES
        )
        self._observe_read(loop.time(), mails)
        await self._handle_entries(
            [(p, entry_id, fields) for p, entries in found for entry_id, fields in entries],
            reclaimed=False,
        )

    def _read_window(self, now: float) -> float:
        """Seconds to wait before the next read (the read window above), else 0."""
        rate = self._mail_rate
        if rate * READ_WINDOW_S < READ_WINDOW_MIN_MAILS:
            return 0.0
        return min(READ_WINDOW_S, CHUNK / rate) - (now - self._last_read)

    def _observe_read(self, now: float, mails: int) -> None:
        """The rate of new mails, from a read that returned ``mails`` at ``now``: half
        this read's, half the average before. (After a busy spell, the waits before
        the idle worker's blocking reads delay no mail: a mail that comes during a
        blocking read ends it at once.)"""
        elapsed = max(now - self._last_read, 1e-3)
        self._mail_rate = (self._mail_rate + mails / elapsed) / 2
        self._last_read = now

    async def _read_new(self, count: int, block: int | None) -> list[tuple[int, list]]:
        """New entries as (partition, entries): see the module docstring (6.). COUNT is per
        stream, so each stream gives at most a chunk (a lane's work): one read takes at
        most 128 chunks, however many lanes are free. Handing what is past the free lanes'
        share back to the retry queues instead cost 2x the worker's CPU and 6x Redis's per
        mail in a backlog (loadtests/bench_mail_cpu.py): every such mail was written and
        claimed twice more."""
        return await self._read_streams(min(count, CHUNK), block)

    async def _read_streams(self, count: int, block: int | None) -> list[tuple[int, list]]:
        """Up to ``count`` new entries of each stream, as (partition, entries)."""
        if self._doorbell is None and self.batch.reads_fast:
            return await self.batch.read_new(count, block)
        if self._doorbell is None:
            reply = await self.redis.xreadgroup(
                GROUP, self.name, dict.fromkeys(STREAMS, ">"), count=count, block=block
            )
            return [(PARTITION_OF_STREAM[stream], entries) for stream, entries in reply or ()]
        loop = asyncio.get_running_loop()
        rung = self._doorbell.take()
        if loop.time() >= self._next_sweep:
            self._next_sweep = loop.time() + SWEEP_S
            wanted = list(range(PARTITIONS))
        elif rung:
            wanted = sorted(rung)
        else:
            if block is not None:
                wait_s = min(block / 1000, self._next_sweep - loop.time())
                await self._doorbell.wait(wait_s)
            return []  # the next pass reads what rang meanwhile
        async with self.redis.pipeline(transaction=False) as pipe:
            for partition in wanted:
                pipe.xreadgroup(GROUP, self.name, {STREAMS[partition]: ">"}, count=count)
            replies = await pipe.execute()
        found = []
        for partition, reply in zip(wanted, replies, strict=True):
            for _stream, entries in reply or ():
                if entries:
                    found.append((partition, entries))
                    if len(entries) >= count:  # more may follow: no XADD will say so
                        self._doorbell.ring(partition)
        return found

    # -- health and retention -------------------------------------------------------

    async def _heartbeat(self, *, force: bool = False) -> None:
        loop_now = asyncio.get_running_loop().time()
        if not force and loop_now < self._next_alive:
            return
        self._next_alive = loop_now + self.settings.heartbeat / 3
        value = json.dumps(
            {
                "pid": os.getpid(),
                "at": now_ms(),
                "sessions": self.lanes.limit,
                "metrics_port": self.settings.metrics_port,
                **self.stats,
            }
        )
        await self.redis.set(keys.mail_worker_alive(self.name), value, ex=self.settings.alive_ttl)
        await self._observe_backlog()
        if loop_now >= self._next_log:
            self._next_log = loop_now + self.settings.heartbeat_log
            log.info("mail worker %s alive: %s", self.name, self._stats_line())

    def _count(self, name: str, amount: int = 1) -> None:
        self.stats[name] += amount
        metrics.COUNTERS[name].inc(amount)

    async def _observe_backlog(self) -> None:
        """With MAIL_METRICS_PORT set: pending, lag, oldest waiting mail, retry queue
        and dead letters (app/mail_backlog.py)."""
        loop_now = asyncio.get_running_loop().time()
        if not self.settings.metrics_port or loop_now < self._next_backlog:
            return
        self._next_backlog = loop_now + BACKLOG_INTERVAL
        backlog = await read_mail_backlog(self.redis)
        if backlog is None:
            return
        metrics.PENDING.set(backlog.pending)
        metrics.LAG.set(backlog.undelivered)
        metrics.LAG_EXACT.set(1 if backlog.exact else 0)
        metrics.OLDEST_WAITING.set(backlog.oldest_age_s(now_ms()))
        metrics.RETRY_QUEUE.set(backlog.retrying)
        metrics.DEAD_LETTERS.set(backlog.dead)

    def _stats_line(self) -> str:
        names = (
            "sent",
            "duplicates",
            "record_retries",
            "retries",
            "throttled",
            "dead",
            "ignored",
            "trimmed",
        )
        return " ".join(f"{name}={self.stats[name]}" for name in names)

    async def trim_events(self) -> int:
        """Every partition's stream trimmed (``trim_stream``). Returns entries removed."""
        cutoff = f"{max(now_ms() - int(self.settings.events_retention * 1000), 0)}-0"
        replies = await self.batch.script_each(
            "trim_events", [([stream], [GROUP, cutoff]) for stream in STREAMS]
        )
        trimmed = sum(int(reply[0]) for reply in replies)
        if trimmed:
            self._count("trimmed", trimmed)
            log.debug("trimmed %d events entries", trimmed)
        return trimmed

    async def trim_stream(self, partition: int) -> tuple[int, str]:
        """XTRIM one partition's stream by MINID up to the oldest entry any group still
        needs, and not within EVENTS_RETENTION_SECONDS. Returns (entries removed, MINID)."""
        cutoff = now_ms() - int(self.settings.events_retention * 1000)
        stream = STREAMS[partition]
        trimmed, minid = await self._trim(keys=[stream], args=[GROUP, f"{max(cutoff, 0)}-0"])
        if trimmed:
            self._count("trimmed", trimmed)
            log.debug("trimmed %d entries of %s before %s", trimmed, stream, minid)
        return trimmed, minid

    async def prune_consumers(self) -> int:
        """Delete consumers with nothing pending that have not read for an hour
        (stopped workers; the default name carries the pid), in every partition's group."""
        idle_ms = int(PRUNE_IDLE_S * 1000)
        replies = await self.batch.script_each(
            "prune_consumers", [([stream], [GROUP, idle_ms, self.name]) for stream in STREAMS]
        )
        deleted = sum(int(reply) for reply in replies)
        if deleted:
            log.info("deleted %d idle consumer(s) without pending mail from %s", deleted, GROUP)
        return deleted

    # -- where entries come from ----------------------------------------------------

    def _block_ms(self) -> int:
        """How long XREADGROUP may block: until the next retry is due (as _due_retries saw it)."""
        if self._next_due_ms is None:
            return MAX_BLOCK_MS
        return int(max(1, min(MAX_BLOCK_MS, self._next_due_ms - now_ms())))

    async def _due_retries(self) -> int:
        """Send the mails whose retry is due. Returns how many were taken."""
        loop_now = asyncio.get_running_loop().time()
        due_now = self._next_due_ms is not None and self._next_due_ms <= now_ms()
        if loop_now >= self._next_retry_probe or due_now:
            # The head of every partition's queue, in one round; most find nothing.
            self._next_retry_probe = loop_now + RETRY_PROBE_S
            self._retry_heads = await self.batch.first_retries()
        self._next_due_ms = min(self._retry_heads.values(), default=None)
        now = now_ms()
        due = [p for p, at in self._retry_heads.items() if at <= now]
        taken = 0
        for partition in due:
            if self.stopping:
                break
            del self._retry_heads[partition]  # looked at again below, with the rest
            taken += await self._due_retries_of(partition)
        if due:
            self._next_retry_probe = 0.0  # more may be due: look again on the next pass
        return taken

    async def _due_retries_of(self, partition: int) -> int:
        retry, stream = keys.mail_retry(partition), STREAMS[partition]
        due = await self.redis.zrangebyscore(
            retry, "-inf", now_ms(), start=0, num=self.settings.batch_size
        )
        taken, entries = 0, []
        for entry_id in due:
            if self.stopping:
                break
            if await self.redis.zrem(retry, entry_id) == 0:
                continue  # another worker took it
            taken += 1
            claimed = await self.redis.xclaim(stream, GROUP, self.name, 0, [entry_id])
            if claimed and claimed[0][1]:  # else acknowledged meanwhile, or gone
                entries.append(claimed[0])
        await self._handle_entries([(partition, e, f) for e, f in entries], reclaimed=False)
        return taken

    def _retry_scheduled(self, partition: int, due_ms: float) -> None:
        """Remember a retry this worker queued, so it is looked for when due."""
        head = self._retry_heads.get(partition)
        self._retry_heads[partition] = due_ms if head is None else min(head, due_ms)
        self._next_due_ms = min(self._retry_heads.values())

    async def _reclaim_idle(self) -> None:
        """XAUTOCLAIM entries idle past MAIL_CLAIM_IDLE_SECONDS (a crashed or stopped
        worker's) in every partition's stream, then handle them, except those still
        waiting for their retry. The first page of every stream in one round."""
        min_idle = int(self.settings.claim_idle * 1000)
        cursors = {partition: "0-0" for partition in range(PARTITIONS)}
        for _ in range(100):  # bounded; the rest waits for the next round
            if self.stopping or not cursors:
                return
            async with self.redis.pipeline(transaction=False) as pipe:
                for partition, cursor in cursors.items():
                    pipe.xautoclaim(
                        STREAMS[partition],
                        GROUP,
                        self.name,
                        min_idle,
                        start_id=cursor,
                        count=self.settings.batch_size,
                    )
                replies = await pipe.execute()
            following, taken = {}, []
            for partition, reply in zip(list(cursors), replies, strict=True):
                cursor, entries = reply[0], reply[1]
                deleted = reply[2] if len(reply) > 2 else []
                if deleted:
                    log.error(
                        "pending entries gone from %s (trimmed by someone else?): %s",
                        STREAMS[partition],
                        deleted,
                    )
                taken += [(partition, e, f) for e, f in entries]
                if cursor != "0-0":
                    following[partition] = cursor
            await self._handle_entries(taken, reclaimed=True)
            cursors = following

    async def _own_backlog(self) -> None:
        """At start, entries still pending for this worker's name (a restart)."""
        starts = {partition: "0" for partition in range(PARTITIONS)}
        while starts and not self.stopping:
            async with self.redis.pipeline(transaction=False) as pipe:
                for partition, start in starts.items():
                    pipe.xreadgroup(
                        GROUP,
                        self.name,
                        {STREAMS[partition]: start},
                        count=self.settings.batch_size,
                    )
                replies = await pipe.execute()
            following, taken = {}, []
            for partition, reply in zip(list(starts), replies, strict=True):
                entries = reply[0][1] if reply else []
                if entries:
                    taken += [(partition, e, f) for e, f in entries]
                    following[partition] = entries[-1][0]
            await self._handle_entries(taken, reclaimed=True)
            starts = following

    async def _handle_entries(self, entries: list[Entry], *, reclaimed: bool) -> None:
        """Entries of any partitions' streams: those that need no mail are acknowledged
        (one round trip), the mails go to lanes in chunks."""
        ignored: dict[int, list[str]] = {}
        others = 0
        mails = []
        for entry in entries:
            partition, entry_id, fields = entry
            if fields and fields.get("type") in MAIL_EVENT_TYPES:
                mails.append(entry)
                continue
            ignored.setdefault(partition, []).append(entry_id)
            others += 1 if fields else 0  # no fields: deleted from the stream meanwhile
        if ignored:
            await self.batch.ack(ignored)
            self._count("ignored", others)
        while mails:
            # Chunks of up to CHUNK whatever their partitions: a chunk costs two Redis
            # round trips and a lane's task before its first send, so at a steady
            # rate, where a read finds a few mails of as many partitions, a chunk
            # per partition cost those for every mail. A lane sends a chunk one mail
            # after the other (a round trip and an acknowledgement each), so more
            # than a few lanes help only in a backlog, where reads are large.
            size = min(CHUNK, len(mails))
            if not await self._dispatch(mails[:size], reclaimed=reclaimed):
                await self._release_entries(mails)
                return
            mails = mails[size:]

    async def _dispatch(self, chunk: list[Entry], *, reclaimed: bool) -> bool:
        """Wait for a free lane, then send the chunk's mails on it in a task of its
        own. False when the worker is stopping: the chunk was not taken."""
        if self.stopping:
            return False
        sender = await self.lanes.acquire()
        if self.stopping:  # told to stop while waiting for the lane
            await self.lanes.release(sender)
            return False
        task = asyncio.get_running_loop().create_task(self._on_lane(sender, chunk, reclaimed))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return True

    async def _on_lane(self, sender: SmtpSender, chunk: list[Entry], reclaimed: bool) -> None:
        pause = 0.0
        try:
            await self._heartbeat()
            if reclaimed:
                chunk = [entry for entry in chunk if await self._take_from_retry(*entry[:2])]
            if chunk:
                pause = await self.process(chunk, sender)
        except (RedisError, OSError) as error:
            # The entries stay pending; XAUTOCLAIM takes them again after the claim timeout.
            log.warning("redis unavailable while sending %d mail(s): %s", len(chunk), error)
        except Exception as error:
            if closed_under_the_call(error):
                log.warning("redis connection lost while sending %d mail(s): %r", len(chunk), error)
            else:
                log.exception("unexpected error on a lane (%d mail(s))", len(chunk))
        finally:
            if pause:  # this session backs off; the other lanes go on
                await self._sleep(pause)
            await self.lanes.release(sender)

    async def _take_from_retry(self, partition: int, entry_id: str) -> bool:
        """A reclaimed entry waiting in its retry queue is left alone until it is due."""
        retry = keys.mail_retry(partition)
        score = await self.redis.zscore(retry, entry_id)
        if score is None:
            return True
        if score > now_ms():
            return False
        return await self.redis.zrem(retry, entry_id) == 1

    async def _release_entries(self, entries: list[Entry]) -> None:
        """``_release`` of entries of any partitions."""
        for partition, entry_ids in by_partition((p, e) for p, e, _ in entries).items():
            await self._release(partition, entry_ids)

    async def _release(self, partition: int, entry_ids: list[str]) -> None:
        """On stop: the unsent rest of this batch stays pending but is marked idle
        for a year, so the next XAUTOCLAIM of any worker takes it at once."""
        if entry_ids:
            await self.redis.xclaim(
                STREAMS[partition],
                GROUP,
                self.name,
                0,
                entry_ids,
                idle=RELEASED_IDLE_MS,
                justid=True,
            )

    # -- a chunk of mails on one lane -----------------------------------------------

    async def process(self, chunk: list[Entry], sender: SmtpSender) -> float:
        """Send the chunk's mails one after the other on ``sender``: two Redis round
        trips for the whole chunk before the first send (mail/batch_redis.py), one
        MULTI after each. Returns the seconds the lane backs off (after a
        throttle), else 0."""
        done: dict[int, list[tuple[str, str, str | None, int]]] = {}  # redeliveries
        # Accepted already, its record still being written by the lane that sent it
        # (which acknowledges the entry too, whoever holds it now): not sent again.
        chunk = [
            entry for entry in chunk if entry[2].get("order_id") not in self._accepted_unrecorded
        ]
        try:
            ready = await self._prepare(chunk, done)
        finally:
            # One MULTI per partition (one slot each), sent in one write.
            await asyncio.gather(*(self.batch.ack_sent(p, d) for p, d in done.items()))
        return await self._send_all(ready, sender)

    async def _prepare(self, chunk: list[Entry], done: dict[int, list]) -> list[Ready]:
        """The chunk's data, the hold and the render: the mails to send, in order."""
        valid = []
        for partition, entry_id, fields in chunk:
            order_id = fields.get("order_id", "")
            if not is_valid_id(order_id):
                await self._bad(partition, entry_id, fields, f"invalid order id {order_id[:64]!r}")
            elif partition_of(order_id) != partition:
                # Its mail keys would be in another slot than this stream: never written
                # by the order scripts, which append to their order's partition.
                await self._bad(
                    partition, entry_id, fields, f"order {order_id} is of another partition"
                )
            else:
                valid.append((partition, entry_id, fields, order_id))
        if not valid:
            return []
        already, orders = await self.batch.prefetch([order_id for *_, order_id in valid])
        wanted = []
        for (partition, entry_id, fields, order_id), sent, order in zip(
            valid, already, orders, strict=True
        ):
            if sent:  # a redelivery: acknowledge, send nothing
                done.setdefault(partition, []).append((entry_id, order_id, None, 0))
                self._count("duplicates")
                with request_context(fields):
                    log.info(
                        "order %s: confirmation already sent; acknowledged entry %s",
                        order_id,
                        entry_id,
                    )
                continue
            try:
                customer_id, lines, total = parse_order(order_id, order)
            except BadEvent as error:
                await self._bad(partition, entry_id, fields, str(error))
                continue
            wanted.append((partition, entry_id, fields, order_id, customer_id, lines, total))
        if not wanted:
            return []
        # The rest of the data and, in the same round trip, the hold: the entries
        # are still ours, their idle time reset and the attempt counted. Only the
        # renders (tens of microseconds each) come before the first send, and
        # every send ends before MAIL_CLAIM_IDLE_SECONDS / 2 after the hold, so
        # nobody takes an entry over meanwhile (see _send_all for a slow chunk).
        loaded = await self.batch.load_and_hold(
            [(p, e, o, c, [phone for phone, _, _ in lines]) for p, e, _, o, c, lines, _ in wanted]
        )
        held_at = asyncio.get_running_loop().time()
        ready = []
        for (partition, entry_id, fields, order_id, customer_id, lines, total), data in zip(
            wanted, loaded, strict=True
        ):
            if not data.attempts:
                with request_context(fields):
                    log.info(
                        "order %s: entry %s was taken over by another worker", order_id, entry_id
                    )
                continue
            item = await self._render(
                partition, entry_id, fields, order_id, customer_id, lines, total, data
            )
            if item is not None:
                ready.append(replace(item, held_at=held_at))
        return ready

    async def _render(
        self,
        partition: int,
        entry_id: str,
        fields: dict[str, str],
        order_id: str,
        customer_id: str,
        lines: list[tuple[str, int, int]],
        total: int,
        data: Loaded,
    ) -> Ready | None:
        name, surname, address, balance = data.customer
        attempts = data.attempts
        with request_context(fields):
            try:
                if address is None:
                    raise BadEvent(f"customer {customer_id} of order {order_id} not found")
                # The balance right after the event, when the event carries it; else now.
                raw_balance = fields.get("balance_cents") or balance or "0"
                try:
                    balance_cents = int(raw_balance)
                except ValueError:
                    balance_cents = int(balance or 0)
                mail = OrderMail(
                    order_id=order_id,
                    customer_name=name or "",
                    customer_surname=surname or "",
                    email=address,
                    lines=tuple(
                        MailLine(phone_id, phone_name or phone_id, quantity, price)
                        for (phone_id, quantity, price), phone_name in zip(
                            lines, data.phone_names, strict=True
                        )
                    ),
                    total_cents=total,
                    balance_cents=balance_cents,
                )
                rendered = render_confirmation(
                    mail, sender=self.from_address, mail_domain=self.settings.mail_domain
                )
            except BadEvent as error:
                await self.dead_letter(partition, entry_id, fields, clip(str(error)), attempts=0)
                return None
            except (InvalidRecipient, UnsafeMessage) as error:
                reason = clip(f"invalid recipient: {error}")
                await self.dead_letter(partition, entry_id, fields, reason, attempts - 1)
                return None
            except Exception as error:
                # A bug, not the server: retry like a 4xx, so that a poison entry ends
                # in the dead letters after MAIL_MAX_ATTEMPTS instead of looping.
                log.exception("order %s: unexpected error", order_id)
                await self._unexpected(partition, entry_id, fields, error)
                return None
            if attempts > self.settings.max_attempts:  # only after crashes mid-send
                await self.dead_letter(
                    partition, entry_id, fields, "max attempts reached", attempts - 1
                )
                return None
        return Ready(partition, entry_id, fields, order_id, attempts, rendered, 0.0)

    async def _send_all(self, ready: list[Ready], sender: SmtpSender) -> float:
        loop = asyncio.get_running_loop()
        renew_after = self.settings.claim_idle / 4
        index = 0
        while index < len(ready):
            item = ready[index]
            if self.stopping:  # the mail in hand is finished; the rest is handed back
                await self._hand_back(ready[index:], for_takeover=True)
                return 0.0
            if loop.time() - item.held_at > renew_after:
                # Slow sends: the rest is held again before it is sent.
                rest = ready[index:]
                renewed = await self.batch.hold(
                    [(r.partition, r.entry_id, r.order_id) for r in rest]
                )
                held_at = loop.time()
                ready[index:] = [
                    replace(r, held_at=held_at)
                    for r, attempts in zip(rest, renewed, strict=True)
                    if attempts
                ]
                continue
            index += 1
            following = ready[index] if index < len(ready) else None
            with request_context(item.fields):
                outcome = await self._send(item, sender, following)
            if outcome == "throttled":
                # The relay said "later" on this session: the rest of the chunk goes
                # back to the retry queue, due now, for a lane that is not backing off.
                await self._hand_back(ready[index:])
                return sender.throttle_pause
            if outcome == "sent":
                # Acknowledged before the next send, so a crash re-sends at most the
                # mail in hand. The lanes' acknowledgements of one event-loop turn
                # share one write (app/fastredis.py) and one AOF fsync.
                await self._record_sent(item.partition, item)
        return 0.0

    async def _record_sent(self, partition: int, item: Ready) -> None:
        """The accepted mail's record: its marker, XACK. Refused (a failover: the primary
        gone, its heir refusing writes until its own replica is back), it is tried
        again here until Redis takes it: left pending, the entry would be taken over
        after MAIL_CLAIM_IDLE_SECONDS and the mail sent a second time. A stop gives up
        (the mail is then sent again: at least once)."""
        sent = [(item.entry_id, item.order_id, item.rendered.message_id, now_ms())]
        self._accepted_unrecorded.add(item.order_id)
        try:
            failures = 0
            while True:
                try:
                    await self.batch.ack_sent(partition, sent)
                    return
                except (RedisError, OSError) as error:
                    if self.stopping:
                        raise
                    failures += 1
                    self._count("record_retries")
                    delay = min(1.0, 0.05 * 2**failures)
                    log.warning(
                        "order %s: accepted, its record refused (%s); again in %.2fs",
                        item.order_id,
                        clip(str(error)),
                        delay,
                    )
                    await self._sleep(delay)
        finally:
            self._accepted_unrecorded.discard(item.order_id)

    async def _send(self, item: Ready, sender: SmtpSender, following: Ready | None) -> str:
        """One mail on the lane's session (``following``: the lane's next mail, whose
        envelope may go out with this content). Returns sent | retry | throttled | dead."""
        partition, entry_id, fields, order_id, attempts = (
            item.partition,
            item.entry_id,
            item.fields,
            item.order_id,
            item.attempts,
        )
        rendered = item.rendered
        started = time.perf_counter()
        try:
            async with asyncio.timeout_at(item.held_at + self.settings.send_deadline):
                await sender.send(
                    rendered.raw,
                    self.from_address.addr_spec,
                    [rendered.recipient],
                    then=None
                    if following is None
                    else (
                        self.from_address.addr_spec,
                        [following.rendered.recipient],
                        following.rendered.raw,
                    ),
                )
        except Exception as error:
            metrics.SEND_FAILED.observe(time.perf_counter() - started)
            failure = classify(error)
            reason = clip(failure.reason)
            if failure.kind == "permanent":
                await self.dead_letter(partition, entry_id, fields, reason, attempts)
                return "dead"
            if failure.kind == "throttle":
                if failure.refused:
                    self.lanes.refused()
                sender.throttled += 1
                await self._schedule_retry(
                    partition,
                    entry_id,
                    order_id,
                    attempts,
                    reason,
                    delay=sender.throttle_pause,
                    refund=True,
                )
                return "throttled"
            if attempts >= self.settings.max_attempts:
                await self.dead_letter(
                    partition,
                    entry_id,
                    fields,
                    clip(f"max attempts reached; last: {reason}"),
                    attempts,
                )
                return "dead"
            await self._schedule_retry(partition, entry_id, order_id, attempts, reason)
            return "retry"
        sender.throttled = 0
        self.lanes.sent()
        metrics.SEND_ACCEPTED.observe(time.perf_counter() - started)
        metrics.DELIVERY_LAG.observe(max(0.0, (now_ms() - entry_ms(entry_id)) / 1000))
        self._count("sent")
        log.info("order %s: confirmation sent (attempt %d)", order_id, attempts)
        return "sent"

    async def _hand_back(self, rest: list[Ready], *, for_takeover: bool = False) -> None:
        """Mails held but not sent, their attempt taken back: due in the retry
        queue now, or (``for_takeover``, a stopping worker) left pending but idle
        for a year, so the next XAUTOCLAIM of any worker takes them at once. One
        MULTI per partition (one slot each)."""
        due = now_ms()
        for partition, items in by_partition((r.partition, r) for r in rest).items():
            async with self.redis.pipeline(transaction=True) as pipe:
                if not for_takeover:
                    pipe.zadd(keys.mail_retry(partition), {r.entry_id: due for r in items})
                for r in items:
                    pipe.decr(keys.mail_attempts(r.order_id))
                await pipe.execute()
            if for_takeover:
                await self._release(partition, [r.entry_id for r in items])
            else:
                self._retry_scheduled(partition, due)

    async def _unexpected(
        self, partition: int, entry_id: str, fields: dict[str, str], error: Exception
    ) -> str:
        order_id = fields.get("order_id", "")
        reason = clip(f"internal error: {type(error).__name__}: {error}")
        if not is_valid_id(order_id) or partition_of(order_id) != partition:
            await self.dead_letter(partition, entry_id, fields, reason, attempts=0)
            return "dead"
        attempts = await self.redis.incr(keys.mail_attempts(order_id))
        await self.redis.expire(keys.mail_attempts(order_id), ATTEMPTS_TTL_S)
        if attempts >= self.settings.max_attempts:
            await self.dead_letter(partition, entry_id, fields, reason, attempts)
            return "dead"
        await self._schedule_retry(partition, entry_id, order_id, attempts, reason)
        return "retry"

    async def _bad(
        self, partition: int, entry_id: str, fields: dict[str, str], reason: str
    ) -> None:
        with request_context(fields):
            await self.dead_letter(partition, entry_id, fields, clip(reason), attempts=0)

    def backoff(self, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``: exponential, capped, with jitter
        (half fixed, half random, so retries of many mails spread out)."""
        s = self.settings
        cap = min(s.backoff_max, s.backoff_base * 2 ** min(attempts - 1, 60))
        return cap / 2 + self._random.uniform(0, cap / 2)

    async def _schedule_retry(
        self,
        partition: int,
        entry_id: str,
        order_id: str,
        attempts: int,
        reason: str,
        *,
        delay: float | None = None,
        refund: bool = False,
    ) -> None:
        """ZADD the entry to its partition's retry queue. ``refund``: a throttle, whose
        attempt is taken back, so that a relay saying "later" never ends in a dead letter."""
        if delay is None:
            delay = self.backoff(attempts)
        due = now_ms() + int(delay * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(keys.mail_retry(partition), {entry_id: due})
            if refund:
                pipe.decr(keys.mail_attempts(order_id))
            await pipe.execute()
        self._retry_scheduled(partition, due)
        self._count("retries")
        if refund:
            self._count("throttled")
        log.warning(
            "order %s: attempt %d %s (%s); retry in %.1fs",
            order_id,
            attempts,
            "throttled, not counted" if refund else "failed",
            reason,
            delay,
        )

    async def dead_letter(
        self, partition: int, entry_id: str, fields: dict[str, str], reason: str, attempts: int
    ) -> None:
        """XADD the partition's dead letters and XACK the entry in one MULTI: never one
        without the other. The attempt counter goes too, when it is this partition's."""
        order_id = fields.get("order_id", "")
        letter = {
            "order_id": order_id[:64],
            "customer_id": fields.get("customer_id", "")[:64],
            "reason": reason,
            "attempts": str(attempts),
            "event_id": entry_id,
            "event_type": fields.get("type", "")[:64],
            "at": str(now_ms()),
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(keys.mail_dead(partition), letter)
            pipe.xack(STREAMS[partition], GROUP, entry_id)
            pipe.zrem(keys.mail_retry(partition), entry_id)
            if is_valid_id(order_id) and partition_of(order_id) == partition:
                pipe.delete(keys.mail_attempts(order_id))
            await pipe.execute()
        self._count("dead")
        log.error(
            "order %s: confirmation dead-lettered after %d attempt(s): %s",
            order_id[:64],
            attempts,
            reason,
        )
