"""The mail worker: consumer group ``mailer`` on the ``events`` stream.

One loop, one SMTP connection, one mail at a time:

1. refresh the health key ``mail:worker:{name}:alive`` (log a line now and then);
2. every EVENTS_TRIM_INTERVAL_SECONDS, trim ``events`` by MINID, never past an
   entry the group has not acknowledged (``mail/lua/trim_events.lua``);
3. take the mails whose retry is due from the ``mail:retry`` zset (ZREM decides
   which worker gets one), XCLAIM and send them;
4. every MAIL_CLAIM_IDLE_SECONDS / 4, XAUTOCLAIM entries idle past
   MAIL_CLAIM_IDLE_SECONDS: a crashed worker's mail is taken over;
5. XREADGROUP a batch of new entries (blocking at most until the next retry is due).

Per ``order.completed`` (or ``mail.requeued``) entry:

- the ``mail:sent:{order_id}`` marker exists -> XACK, nothing sent (a redelivery);
- the order, customer or address is unusable -> dead letter at once;
- INCR ``mail:attempts:{order_id}``, send with the stable Message-ID
  ``<order-{id}@{MAIL_DOMAIN}>``;
- accepted -> MULTI: SET the marker NX, DEL attempts, XACK, ZREM retry;
- 5xx -> MULTI: XADD ``mail:dead``, XACK, ZREM retry, DEL attempts. Never retried;
- 4xx, connection error, timeout -> ZADD ``mail:retry`` with a due time
  (exponential backoff with jitter) and move on to the next mail; the entry stays
  pending in the group, so nothing is lost and the stream is not trimmed past it.
  At MAIL_MAX_ATTEMPTS it is dead-lettered instead.

Any other event type is XACKed without a mail. An entry is XACKed only after its
mail was accepted, was already marked sent, or was dead-lettered.

Delivery is at least once: a crash between the server's 250 and the marker, or a
server that drops the connection after the data, sends the mail again, with the
same Message-ID, so the receiving side can deduplicate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import time
from collections import Counter
from contextlib import suppress

import aiosmtplib
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from app import keys
from app.ids import is_valid_id
from app.logs import request_id_var
from mail import MAIL_EVENT_TYPES, metrics, scripts
from mail.render import (
    InvalidRecipient,
    MailLine,
    OrderMail,
    UnsafeMessage,
    render_confirmation,
)
from mail.settings import MailSettings

log = logging.getLogger("mail.worker")

GROUP = keys.MAIL_GROUP
STREAM = keys.EVENTS
# Longest XREADGROUP block: the loop comes round at least this often to
# heartbeat, trim, claim and notice SIGTERM.
MAX_BLOCK_MS = 1000
# A reused SMTP connection idle longer than this is checked with NOOP first.
NOOP_AFTER_IDLE = 15.0
MAX_REASON = 500
# An attempt counter outlives any retry schedule, then expires with its mail.
ATTEMPTS_TTL_S = 30 * 86400
# Consumers idle this long with nothing pending are deleted from the group.
PRUNE_IDLE_S = 3600.0
# Idle time given to entries a stopping worker hands back: past any claim timeout.
RELEASED_IDLE_MS = 365 * 86400 * 1000
# With metrics on, the backlog gauges are refreshed at most this often (seconds).
BACKLOG_INTERVAL = 1.0
# What an event's request_id may look like (the app's pattern) to be logged.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def connect_redis(settings: MailSettings) -> Redis:
    return Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_timeout=MAX_BLOCK_MS / 1000 + 10,
        socket_connect_timeout=5,
        health_check_interval=30,
    )


class SmtpConnectFailed(Exception):
    """Connecting, TLS, EHLO or login failed: about the server, not this mail."""


class SmtpSender:
    """One aiosmtplib connection, reused across mails and reopened when it fails.

    ``reuse=False`` opens a connection per mail (only the benchmark does that).
    """

    def __init__(self, settings: MailSettings, *, reuse: bool = True) -> None:
        self.settings = settings
        self.reuse = reuse
        self._client: aiosmtplib.SMTP | None = None
        self._last_used = 0.0
        self.connections_opened = 0

    async def _connect(self) -> aiosmtplib.SMTP:
        s = self.settings
        client = aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            username=s.smtp_username or None,
            password=s.smtp_password or None,
            use_tls=s.smtp_tls == "tls",
            start_tls=s.smtp_tls == "starttls",
            timeout=s.smtp_timeout,
            cert_bundle=s.smtp_ca_file or None,
        )
        try:
            await client.connect()
        except Exception as error:
            client.close()
            raise SmtpConnectFailed(f"{type(error).__name__}: {error}") from error
        self.connections_opened += 1
        return client

    async def _ready(self) -> aiosmtplib.SMTP:
        client = self._client
        if client is not None and client.is_connected:
            if time.monotonic() - self._last_used < NOOP_AFTER_IDLE:
                return client
            try:  # the server may have closed an idle connection
                await client.noop()
                return client
            except Exception:
                self._drop()
        self._client = await self._connect()
        return self._client

    async def send(self, raw: bytes, sender: str, recipients: list[str]) -> None:
        """Send an already flattened message (CRLF line ends)."""
        client = await self._ready()
        options = [] if raw.isascii() else ["BODY=8BITMIME"]
        try:
            await client.sendmail(sender, recipients, raw, mail_options=options)
        except BaseException:
            # After a failure the session state is unknown: start clean next time.
            self._drop()
            raise
        self._last_used = time.monotonic()
        if not self.reuse:
            await self.close()

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            try:
                await asyncio.wait_for(client.quit(), self.settings.smtp_timeout)
            except Exception:
                client.close()


def classify(error: BaseException) -> tuple[bool, str]:
    """(permanent, reason) for a failed send. RFC 5321 §4.5.4.1: 5xx is final."""
    if isinstance(error, SmtpConnectFailed):
        return False, f"connect failed: {error}"
    if isinstance(error, aiosmtplib.SMTPRecipientsRefused):
        refused = error.recipients
        codes = [r.code for r in refused]
        permanent = bool(codes) and all(500 <= code < 600 for code in codes)
        detail = f"{refused[0].code} {refused[0].message}" if refused else str(error)
        return permanent, f"recipient refused: {detail}"
    if isinstance(error, aiosmtplib.SMTPResponseException):
        return 500 <= error.code < 600, f"{error.code} {error.message}"
    return False, f"{type(error).__name__}: {error}"


def clip(reason: str) -> str:
    return " ".join(reason.split())[:MAX_REASON]


class BadEvent(Exception):
    """The event or the data it points at cannot make a mail: dead-letter it."""


class MailWorker:
    def __init__(
        self, settings: MailSettings, redis: Redis, *, sender: SmtpSender | None = None
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.sender = sender if sender is not None else SmtpSender(settings)
        self.name = settings.worker_name
        self.from_address = settings.from_address
        self.stats: Counter[str] = Counter()
        self._stopping = asyncio.Event()
        self._hold = redis.register_script(scripts.source("hold_entry"))
        self._trim = redis.register_script(scripts.source("trim_events"))
        self._prune = redis.register_script(scripts.source("prune_consumers"))
        self._random = random.Random()
        self._next_trim = 0.0
        self._next_claim = 0.0
        self._next_alive = 0.0
        self._next_log = 0.0
        self._next_backlog = 0.0
        self._group_ready = False

    # -- lifecycle -------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        """Finish the mail in hand, then leave run()."""
        if not self.stopping:
            log.info("mail worker %s stopping after the mail in hand", self.name)
        self._stopping.set()

    async def _sleep(self, seconds: float) -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def ensure_group(self) -> None:
        """Create the `mailer` group from the stream's start (MKSTREAM) if missing."""
        try:
            await self.redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
            log.info("created consumer group %s on %s", GROUP, STREAM)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def run(self) -> None:
        s = self.settings
        log.info(
            "mail worker %s starting: SMTP %s:%d tls=%s, group %s on stream %s",
            self.name,
            s.smtp_host,
            s.smtp_port,
            s.smtp_tls,
            GROUP,
            STREAM,
        )
        failures = 0
        try:
            while not self.stopping:
                try:
                    if not self._group_ready:
                        await self.ensure_group()
                        self._group_ready = True
                        await self._own_backlog()
                    await self.run_once()
                    failures = 0
                except (RedisError, OSError) as error:
                    if "NOGROUP" in str(error):  # the stream or group was deleted: recreate
                        self._group_ready = False
                    failures += 1
                    delay = min(5.0, 0.1 * 2**failures)
                    log.warning("redis unavailable (%s); retrying in %.1fs", error, delay)
                    await self._sleep(delay)
        finally:
            await self.sender.close()
            with suppress(RedisError, OSError):
                await self.redis.delete(keys.mail_worker_alive(self.name))
            log.info("mail worker %s stopped: %s", self.name, self._stats_line())

    async def run_once(self) -> None:
        """One pass of the loop (see the module docstring)."""
        loop = asyncio.get_running_loop()
        await self._heartbeat(force=True)
        if loop.time() >= self._next_trim:
            await self.trim_events()
            await self.prune_consumers()
            self._next_trim = loop.time() + self.settings.trim_interval
        took_retries = await self._due_retries()
        if self.stopping:
            return
        if loop.time() >= self._next_claim:
            await self._reclaim_idle()
            self._next_claim = loop.time() + max(0.05, self.settings.claim_idle / 4)
        if self.stopping:
            return
        # After due retries, look for new entries without waiting: more retries may be due.
        block = None if took_retries else await self._block_ms()
        reply = await self.redis.xreadgroup(
            GROUP, self.name, {STREAM: ">"}, count=self.settings.batch_size, block=block
        )
        for _stream, entries in reply or ():
            await self._handle_batch(entries, reclaimed=False)

    # -- health and retention -------------------------------------------------------

    async def _heartbeat(self, *, force: bool = False) -> None:
        loop_now = asyncio.get_running_loop().time()
        if not force and loop_now < self._next_alive:
            return
        self._next_alive = loop_now + self.settings.heartbeat / 3
        value = json.dumps({"pid": os.getpid(), "at": now_ms(), **self.stats})
        await self.redis.set(keys.mail_worker_alive(self.name), value, ex=self.settings.alive_ttl)
        await self._observe_backlog()
        if loop_now >= self._next_log:
            self._next_log = loop_now + self.settings.heartbeat_log
            log.info("mail worker %s alive: %s", self.name, self._stats_line())

    def _count(self, name: str, amount: int = 1) -> None:
        self.stats[name] += amount
        metrics.COUNTERS[name].inc(amount)

    async def _observe_backlog(self) -> None:
        """With MAIL_METRICS_PORT set: pending, lag, retry queue and dead letters."""
        loop_now = asyncio.get_running_loop().time()
        if not self.settings.metrics_port or loop_now < self._next_backlog:
            return
        self._next_backlog = loop_now + BACKLOG_INTERVAL
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xinfo_groups(STREAM)
            pipe.zcard(keys.MAIL_RETRY)
            pipe.xlen(keys.MAIL_DEAD)
            groups, retrying, dead = await pipe.execute(raise_on_error=False)
        for group in groups if isinstance(groups, list) else ():
            if group.get("name") == GROUP:
                metrics.PENDING.set(group.get("pending") or 0)
                metrics.LAG.set(group.get("lag") or 0)
        if isinstance(retrying, int):
            metrics.RETRY_QUEUE.set(retrying)
        if isinstance(dead, int):
            metrics.DEAD_LETTERS.set(dead)

    def _stats_line(self) -> str:
        names = ("sent", "duplicates", "retries", "dead", "ignored", "trimmed")
        return " ".join(f"{name}={self.stats[name]}" for name in names)

    async def trim_events(self) -> tuple[int, str]:
        """XTRIM events MINID up to the oldest entry any group still needs, and
        not within EVENTS_RETENTION_SECONDS. Returns (entries removed, MINID)."""
        cutoff = now_ms() - int(self.settings.events_retention * 1000)
        trimmed, minid = await self._trim(keys=[STREAM], args=[GROUP, f"{max(cutoff, 0)}-0"])
        if trimmed:
            self._count("trimmed", trimmed)
            log.debug("trimmed %d events entries before %s", trimmed, minid)
        return trimmed, minid

    async def prune_consumers(self) -> int:
        """Delete consumers with nothing pending that have not read for an hour
        (stopped workers; the default name carries the pid)."""
        idle_ms = int(PRUNE_IDLE_S * 1000)
        deleted = await self._prune(keys=[STREAM], args=[GROUP, idle_ms, self.name])
        if deleted:
            log.info("deleted %d idle consumer(s) without pending mail from %s", deleted, GROUP)
        return deleted

    # -- where entries come from ----------------------------------------------------

    async def _block_ms(self) -> int:
        due = await self.redis.zrange(keys.MAIL_RETRY, 0, 0, withscores=True)
        if not due:
            return MAX_BLOCK_MS
        return int(max(1, min(MAX_BLOCK_MS, due[0][1] - now_ms())))

    async def _due_retries(self) -> int:
        """Send the mails whose retry is due. Returns how many were taken."""
        due = await self.redis.zrangebyscore(
            keys.MAIL_RETRY, "-inf", now_ms(), start=0, num=self.settings.batch_size
        )
        taken = 0
        for entry_id in due:
            if self.stopping:
                break
            if await self.redis.zrem(keys.MAIL_RETRY, entry_id) == 0:
                continue  # another worker took it
            taken += 1
            claimed = await self.redis.xclaim(STREAM, GROUP, self.name, 0, [entry_id])
            if not claimed or not claimed[0][1]:
                continue  # acknowledged meanwhile, or gone from the stream
            await self._handle(claimed[0][0], claimed[0][1])
        return taken

    async def _reclaim_idle(self) -> None:
        """XAUTOCLAIM entries idle past MAIL_CLAIM_IDLE_SECONDS (a crashed or stopped
        worker's), then handle them, except those still waiting for their retry."""
        min_idle = int(self.settings.claim_idle * 1000)
        cursor = "0-0"
        for _ in range(100):  # bounded; the rest waits for the next round
            if self.stopping:
                return
            reply = await self.redis.xautoclaim(
                STREAM,
                GROUP,
                self.name,
                min_idle,
                start_id=cursor,
                count=self.settings.batch_size,
            )
            cursor, entries = reply[0], reply[1]
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:
                log.error(
                    "pending entries gone from %s (trimmed by someone else?): %s", STREAM, deleted
                )
            if entries:
                await self._handle_batch(entries, reclaimed=True)
            if cursor == "0-0":
                return

    async def _own_backlog(self) -> None:
        """At start, entries still pending for this worker's name (a restart)."""
        start = "0"
        while not self.stopping:
            reply = await self.redis.xreadgroup(
                GROUP, self.name, {STREAM: start}, count=self.settings.batch_size
            )
            entries = reply[0][1] if reply else []
            if not entries:
                return
            await self._handle_batch(entries, reclaimed=True)
            start = entries[-1][0]

    async def _handle_batch(self, entries: list, *, reclaimed: bool) -> None:
        others = [
            entry_id for entry_id, f in entries if f and f.get("type") not in MAIL_EVENT_TYPES
        ]
        gone = [entry_id for entry_id, f in entries if not f]
        if others or gone:
            await self.redis.xack(STREAM, GROUP, *others, *gone)
            self._count("ignored", len(others))
        mails = [
            (entry_id, f) for entry_id, f in entries if f and f.get("type") in MAIL_EVENT_TYPES
        ]
        loop = asyncio.get_running_loop()
        started = loop.time()
        for index, (entry_id, fields) in enumerate(mails):
            if self.stopping:
                await self._release([entry_id for entry_id, _ in mails[index:]])
                return
            await self._heartbeat()
            if reclaimed and not await self._take_from_retry(entry_id):
                continue
            # Late in a long batch another worker may have taken the entry over.
            if loop.time() - started > self.settings.claim_idle / 2 and not await self._hold(
                keys=[STREAM], args=[GROUP, self.name, entry_id]
            ):
                continue
            await self._handle(entry_id, fields)

    async def _take_from_retry(self, entry_id: str) -> bool:
        """A reclaimed entry waiting in mail:retry is left alone until it is due."""
        score = await self.redis.zscore(keys.MAIL_RETRY, entry_id)
        if score is None:
            return True
        if score > now_ms():
            return False
        return await self.redis.zrem(keys.MAIL_RETRY, entry_id) == 1

    async def _release(self, entry_ids: list[str]) -> None:
        """On stop: the unsent rest of this batch stays pending but is marked idle
        for a year, so the next XAUTOCLAIM of any worker takes it at once."""
        if entry_ids:
            await self.redis.xclaim(
                STREAM, GROUP, self.name, 0, entry_ids, idle=RELEASED_IDLE_MS, justid=True
            )

    # -- one mail --------------------------------------------------------------------

    async def _handle(self, entry_id: str, fields: dict[str, str]) -> str:
        # Every log line about this mail carries the id of the request that
        # caused the event (the order scripts put it in): one grep follows an
        # order from nginx's access log to here.
        request_id = fields.get("request_id", "")
        token = request_id_var.set(request_id if _REQUEST_ID.fullmatch(request_id) else None)
        try:
            return await self._handle_entry(entry_id, fields)
        finally:
            request_id_var.reset(token)

    async def _handle_entry(self, entry_id: str, fields: dict[str, str]) -> str:
        try:
            return await self.process(entry_id, fields)
        except BadEvent as error:
            await self.dead_letter(entry_id, fields, clip(str(error)), attempts=0)
            return "dead"
        except (RedisError, OSError):
            raise  # Redis is down: the run loop waits; the entry stays pending
        except Exception as error:
            # A bug, not the server: retry like a 4xx, so that a poison entry ends
            # in the dead letters after MAIL_MAX_ATTEMPTS instead of looping.
            log.exception("order %s: unexpected error", fields.get("order_id", "")[:64])
            return await self._unexpected(entry_id, fields, error)

    async def _unexpected(self, entry_id: str, fields: dict[str, str], error: Exception) -> str:
        order_id = fields.get("order_id", "")
        reason = clip(f"internal error: {type(error).__name__}: {error}")
        if not is_valid_id(order_id):
            await self.dead_letter(entry_id, fields, reason, attempts=0)
            return "dead"
        attempts = await self.redis.incr(keys.mail_attempts(order_id))
        await self.redis.expire(keys.mail_attempts(order_id), ATTEMPTS_TTL_S)
        if attempts >= self.settings.max_attempts:
            await self.dead_letter(entry_id, fields, reason, attempts)
            return "dead"
        await self._schedule_retry(entry_id, order_id, attempts, reason)
        return "retry"

    async def process(self, entry_id: str, fields: dict[str, str]) -> str:
        """Send one entry's mail. Returns sent | duplicate | retry | dead."""
        order_id = fields.get("order_id", "")
        if not is_valid_id(order_id):
            raise BadEvent(f"invalid order id {order_id[:64]!r}")
        sent_key, attempts_key = keys.mail_sent(order_id), keys.mail_attempts(order_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(sent_key)
            pipe.hgetall(keys.order(order_id))
            pipe.get(attempts_key)
            already_sent, order, attempts = await pipe.execute()
        if already_sent:
            await self._ack_sent(entry_id, order_id, None)
            self._count("duplicates")
            log.info(
                "order %s: confirmation already sent; acknowledged entry %s", order_id, entry_id
            )
            return "duplicate"
        attempts = int(attempts or 0)
        try:
            mail = await self._load(order_id, order, fields)
            rendered = render_confirmation(
                mail, sender=self.from_address, mail_domain=self.settings.mail_domain
            )
        except (InvalidRecipient, UnsafeMessage) as error:
            await self.dead_letter(entry_id, fields, clip(f"invalid recipient: {error}"), attempts)
            return "dead"

        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(attempts_key)
            pipe.expire(attempts_key, ATTEMPTS_TTL_S)
            attempts, _ = await pipe.execute()
        if attempts > self.settings.max_attempts:  # only after crashes mid-send
            await self.dead_letter(entry_id, fields, "max attempts reached", attempts - 1)
            return "dead"
        started = time.perf_counter()
        try:
            await self.sender.send(rendered.raw, self.from_address.addr_spec, [rendered.recipient])
        except Exception as error:
            metrics.SEND_DURATION.labels("failed").observe(time.perf_counter() - started)
            permanent, reason = classify(error)
            reason = clip(reason)
            if permanent:
                await self.dead_letter(entry_id, fields, reason, attempts)
                return "dead"
            if attempts >= self.settings.max_attempts:
                await self.dead_letter(
                    entry_id, fields, clip(f"max attempts reached; last: {reason}"), attempts
                )
                return "dead"
            await self._schedule_retry(entry_id, order_id, attempts, reason)
            return "retry"
        metrics.SEND_DURATION.labels("accepted").observe(time.perf_counter() - started)
        await self._ack_sent(entry_id, order_id, rendered.message_id)
        self._count("sent")
        log.info("order %s: confirmation sent (attempt %d)", order_id, attempts)
        return "sent"

    async def _load(
        self, order_id: str, order: dict[str, str], fields: dict[str, str]
    ) -> OrderMail:
        if not order:
            raise BadEvent(f"order {order_id} not found")
        customer_id = order.get("customer_id", "")
        if not is_valid_id(customer_id):
            raise BadEvent(f"order {order_id} has an invalid customer id")
        try:
            lines = []
            for item in filter(None, order.get("items", "").split(";")):
                phone_id, quantity, price = item.split(":")
                if not is_valid_id(phone_id):
                    raise ValueError("phone id")
                lines.append((phone_id, int(quantity), int(price)))
            total = int(order["total_cents"])
        except (ValueError, KeyError):
            raise BadEvent(f"order {order_id} is malformed") from None
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(keys.customer(customer_id), ["name", "surname", "email", "balance_cents"])
            for phone_id, _, _ in lines:
                pipe.hget(keys.phone(phone_id), "name")
            (name, surname, address, balance), *phone_names = await pipe.execute()
        if address is None:
            raise BadEvent(f"customer {customer_id} of order {order_id} not found")
        # The balance right after the event, when the event carries it; else now.
        raw_balance = fields.get("balance_cents") or balance or "0"
        try:
            balance_cents = int(raw_balance)
        except ValueError:
            balance_cents = int(balance or 0)
        return OrderMail(
            order_id=order_id,
            customer_name=name or "",
            customer_surname=surname or "",
            email=address,
            lines=tuple(
                MailLine(phone_id, phone_name or phone_id, quantity, price)
                for (phone_id, quantity, price), phone_name in zip(lines, phone_names, strict=True)
            ),
            total_cents=total,
            balance_cents=balance_cents,
        )

    async def _ack_sent(self, entry_id: str, order_id: str, mid: str | None) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            if mid is not None:
                pipe.set(
                    keys.mail_sent(order_id),
                    json.dumps({"message_id": mid, "at": now_ms()}),
                    nx=True,
                )
            pipe.delete(keys.mail_attempts(order_id))
            pipe.xack(STREAM, GROUP, entry_id)
            pipe.zrem(keys.MAIL_RETRY, entry_id)
            await pipe.execute()

    def backoff(self, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``: exponential, capped, with jitter
        (half fixed, half random, so retries of many mails spread out)."""
        s = self.settings
        cap = min(s.backoff_max, s.backoff_base * 2 ** min(attempts - 1, 60))
        return cap / 2 + self._random.uniform(0, cap / 2)

    async def _schedule_retry(
        self, entry_id: str, order_id: str, attempts: int, reason: str
    ) -> None:
        delay = self.backoff(attempts)
        await self.redis.zadd(keys.MAIL_RETRY, {entry_id: now_ms() + int(delay * 1000)})
        self._count("retries")
        log.warning(
            "order %s: attempt %d failed (%s); retry in %.1fs", order_id, attempts, reason, delay
        )

    async def dead_letter(
        self, entry_id: str, fields: dict[str, str], reason: str, attempts: int
    ) -> None:
        """XADD mail:dead and XACK the entry in one MULTI: never one without the other."""
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
            pipe.xadd(keys.MAIL_DEAD, letter)
            pipe.xack(STREAM, GROUP, entry_id)
            pipe.zrem(keys.MAIL_RETRY, entry_id)
            if is_valid_id(order_id):
                pipe.delete(keys.mail_attempts(order_id))
            await pipe.execute()
        self._count("dead")
        log.error(
            "order %s: confirmation dead-lettered after %d attempt(s): %s",
            order_id[:64],
            attempts,
            reason,
        )
