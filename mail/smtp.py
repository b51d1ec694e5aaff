"""Sending through the SMTP relay: sessions, their lanes, and what a failure means.

``SmtpSender`` is one SMTP session at a time, reused for up to
MAIL_MAX_PER_CONNECTION mails; ``Lanes`` are MAIL_CONCURRENCY of them, fewer
while the relay refuses connections; ``classify`` tells a permanent failure
from a throttle and a temporary one (RFC 5321). The worker (mail/worker.py)
decides what happens to the mail.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

from mail import metrics
from mail.settings import MailSettings
from mail.smtp_wire import SmtpConnectFailed, SmtpConnection, SmtpReplyError

# The worker's logger: the relay's refusals read as the worker's lines.
log = logging.getLogger("mail.worker")

# Sends in a row without a refused connection before one more SMTP session is tried.
GROW_AFTER = 50


class SmtpSender:
    """One SMTP session at a time, reused for up to MAIL_MAX_PER_CONNECTION mails
    and closed after MAIL_IDLE_TIMEOUT_SECONDS unused; reopened when it fails.

    ``reuse=False`` opens a connection per mail (only the benchmark does that).
    """

    def __init__(self, settings: MailSettings, *, reuse: bool = True) -> None:
        self.settings = settings
        self.reuse = reuse
        self._client: SmtpConnection | None = None
        self._last_used = 0.0
        self._sent_on_session = 0
        self._closing: set[asyncio.Task] = set()
        self._random = random.Random()
        self.connections_opened = 0
        # Throttles in a row on this session (421, 451, 452, refused): it backs off.
        self.throttled = 0

    @property
    def throttle_pause(self) -> float:
        """Seconds this session waits after its latest throttle: exponential in the
        throttles in a row, capped, half of it random so sessions spread out."""
        s = self.settings
        cap = min(s.backoff_max, s.backoff_base * 2 ** min(max(self.throttled, 1) - 1, 60))
        return cap / 2 + self._random.uniform(0, cap / 2)

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected

    @property
    def spent(self) -> bool:
        """The open session carried MAIL_MAX_PER_CONNECTION mails: the next opens anew."""
        return self.connected and self._sent_on_session >= self.settings.max_per_connection

    def idle_for(self, now: float) -> float:
        return now - self._last_used if self.connected else 0.0

    async def _connect(self) -> SmtpConnection:
        s = self.settings
        client = await SmtpConnection.open(
            s.smtp_host,
            s.smtp_port,
            timeout=s.smtp_timeout,
            ehlo_name=s.ehlo_name,
            tls=s.smtp_tls,
            ca_file=s.smtp_ca_file or None,
            username=s.smtp_username or None,
            password=s.smtp_password or None,
        )
        self.connections_opened += 1
        self._sent_on_session = 0
        return client

    async def _ready(self, sender: str, recipients: list[str]) -> SmtpConnection:
        if self._client is not None and self._client.announced():
            if self._client.announced(sender, recipients):
                return self._client  # its envelope is out already: send its content
            self._drop()  # another mail was announced and is not coming: no mail there
        if self.connected and (
            self._sent_on_session >= self.settings.max_per_connection
            or self.idle_for(time.monotonic()) >= self.settings.idle_timeout
        ):
            # QUIT first, then connect: a relay counting sessions has this one
            # closed before the next arrives.
            client, self._client = self._client, None
            await self._quit(client)
        if self._client is None or not self._client.is_connected:
            self._drop()
            self._client = await self._connect()
        return self._client

    async def send(
        self,
        raw: bytes,
        sender: str,
        recipients: list[str],
        then: tuple[str, list[str], bytes] | None = None,
    ) -> None:
        """Send an already flattened message (CRLF line ends). ``then``: the mail
        the caller sends next on this lane; when the relay offers PIPELINING and
        this session carries it too, its envelope goes out with this content."""
        client = await self._ready(sender, recipients)
        if not self.reuse or self._sent_on_session + 1 >= self.settings.max_per_connection:
            then = None
        try:
            await client.send_mail(sender, recipients, raw, then)
        except BaseException:
            # After a failure the session state is unknown: start clean next time.
            self._drop()
            raise
        self._last_used = time.monotonic()
        self._sent_on_session += 1
        if not self.reuse:
            await self.close()

    def release_session(self) -> None:
        """QUIT the open session in the background; the next send opens a new one."""
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            task = asyncio.get_running_loop().create_task(self._quit(client))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _quit(self, client: SmtpConnection) -> None:
        with suppress(Exception):
            await client.quit()  # each reply waits at most SMTP_TIMEOUT_SECONDS

    def _drop(self) -> None:
        if self._client is not None:
            self._client.abort()
            self._client = None

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            await self._quit(client)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


# Replies that mean "not now" from the relay, whatever the mail (RFC 5321 4.2.2,
# RFC 3463): service not available, local error, insufficient storage.
THROTTLE_CODES = frozenset({421, 451, 452})


@dataclass(frozen=True)
class Failure:
    """How a failed send is handled. ``kind``: permanent (dead letter at once),
    throttle (retry, no attempt counted, the lane backs off), temporary (retry,
    counted against MAIL_MAX_ATTEMPTS). ``refused``: the relay refused the
    connection itself, so fewer connections are used."""

    kind: str
    reason: str
    refused: bool = False


def classify(error: BaseException) -> Failure:
    """RFC 5321 4.5.4.1: 5xx is final; 421/451/452 and refused connections are throttles."""
    if isinstance(error, SmtpConnectFailed):
        return Failure("throttle", f"connect failed: {error}", refused=True)
    if isinstance(error, SmtpReplyError):
        if 500 <= error.code < 600:
            kind = "permanent"
        elif error.code in THROTTLE_CODES:
            kind = "throttle"
        else:
            kind = "temporary"
        what = "recipient refused: " if error.command == "RCPT" else ""
        return Failure(kind, f"{what}{error.code} {error.message}")
    if isinstance(error, TimeoutError):
        return Failure("temporary", f"send took longer than its deadline or timeout: {error}")
    return Failure("temporary", f"{type(error).__name__}: {error}")


class Lanes:
    """MAIL_CONCURRENCY SmtpSenders, each sending one mail at a time.

    ``limit`` lanes may be busy at once. When the relay refuses a connection, the
    limit drops to the sessions the relay does hold open (at least 1); every
    GROW_AFTER sends in a row without a refusal it grows by one again, up to
    MAIL_CONCURRENCY. A lane is taken last-in first-out, so light traffic keeps
    few sessions open and the others time out idle.
    """

    def __init__(self, settings: MailSettings, make: Callable[[], SmtpSender]) -> None:
        self.size = settings.concurrency
        self.limit = self.size
        self.lowest_limit = self.size
        self.busy = 0
        self._free = [make() for _ in range(self.size)]
        self._all = list(self._free)
        self._changed = asyncio.Condition()
        self._sends_since_refusal = 0

    @property
    def free(self) -> int:
        return max(0, self.limit - self.busy)

    async def acquire(self) -> SmtpSender:
        async with self._changed:
            await self._changed.wait_for(lambda: self.busy < self.limit)
            self.busy += 1
            # A lane with an open session first: a new one is opened only when no
            # free lane has one, so sessions never outnumber busy lanes.
            for index in range(len(self._free) - 1, -1, -1):
                if self._free[index].connected:
                    return self._free.pop(index)
            return self._free.pop()

    async def wait_free(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a free lane; True when one is free."""
        if self.busy < self.limit:  # the common case, without wait_for's task
            return True
        async with self._changed:
            with suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.busy < self.limit), seconds
                )
            return self.busy < self.limit

    async def release(self, sender: SmtpSender) -> None:
        # Past the limit (it was lowered), the session is closed, QUIT awaited,
        # while the lane still counts as busy: the relay gets its slot back first.
        if sender.connected and self.open_sessions() > self.limit:
            await sender.close()
        async with self._changed:
            self.busy -= 1
            self._free.append(sender)
            self._changed.notify_all()

    def open_sessions(self) -> int:
        return sum(1 for sender in self._all if sender.connected)

    def sent(self) -> None:
        self._sends_since_refusal += 1
        if self._sends_since_refusal >= GROW_AFTER and self.limit < self.size:
            self._sends_since_refusal = 0
            self.limit += 1
            metrics.CONNECTIONS_LIMIT.set(self.limit)
            log.info("relay accepting again: up to %d SMTP sessions", self.limit)

    def refused(self) -> None:
        self._sends_since_refusal = 0
        limit = max(1, min(self.limit - 1, self.open_sessions()))
        if limit < self.limit:
            self.limit = limit
            self.lowest_limit = min(self.lowest_limit, limit)
            metrics.CONNECTIONS_LIMIT.set(limit)
            log.warning("relay refused a connection: down to %d SMTP session(s)", limit)

    def close_idle(self, now: float, idle_timeout: float) -> None:
        for sender in self._free:
            if sender.idle_for(now) >= idle_timeout or sender.spent:
                sender.release_session()

    async def close(self) -> None:
        await asyncio.gather(*(sender.close() for sender in self._all), return_exceptions=True)
