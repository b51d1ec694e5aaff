"""Fixtures of the mail tests (a pytest plugin: conftest.py lists it in
``pytest_plugins``). Real processes only:

- ``smtp_server``: an aiosmtpd server on a free 127.0.0.1 port (its own thread
  and loop) that records what it accepted and can be scripted to answer 4xx/5xx
  or to drop the connection after the data; like a relay, it can also refuse
  every k-th connection or those past a cap with 421 at the greeting, answer
  slowly on chosen connections, and it records each session (EHLO name, mails);
  parametrized with ``BOTH_WAYS``, a test runs once against it offering
  PIPELINING (RFC 2920) too;
- ``mail_redis``: a str-decoding client on the suite's ``redis_server``, flushed;
- ``mail_settings``: MailSettings pointed at both, with short backoffs;
- ``mail_workers``: starts ``MailWorker``s in this loop and stops them at the end;
- ``mail_processes``: starts ``python -m mail`` subprocesses, stopped (SIGTERM) at the end;
  a stopping worker's blocked read is ended at once (``unblock_reads``);
- ``seed_order`` and ``event_fields``: an order's hashes and its ``events`` entry, as the
  order scripts write them;
- ``mail_sink``: a ``python -m mail.sink`` process writing into a temp folder;
  ``mail_sink_tls`` the same offering STARTTLS with a self-signed certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app import keys, partitions
from app.ids import new_id
from app.ops.instances import ROOT, mail_argv
from app.ops.poll import wait_until, wait_until_async
from app.vocabulary import stored_order_fields
from loadtests.support.mail_sink import MailSink, running_sink
from loadtests.support.servers import RedisServer, clean_env, free_port, stop_process
from mail.settings import MailSettings
from mail.worker import MailWorker

DROP = "drop"  # scripted action: take the data, then close the connection unanswered


@dataclass(frozen=True)
class Received:
    """One message the server took in, with its envelope."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    accepted: bool  # False: the server dropped the connection instead of answering

    @property
    def message(self) -> EmailMessage:
        return BytesParser(policy=policy.default).parsebytes(self.raw)  # type: ignore[return-value]

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"])


@dataclass
class Session:
    """One SMTP connection the server took: its number (from 1), the EHLO name,
    the mails accepted on it, and whether it was refused at the greeting."""

    number: int
    refused: bool = False
    helo: str = ""
    mails: int = 0
    open: bool = True


@dataclass
class ScriptedHandler:
    """aiosmtpd handler: answers DATA from ``script`` first ("451 ...", "550 ...",
    DROP), then with 250; ``delay`` seconds pass before each answer."""

    script: deque[str] = field(default_factory=deque)
    # Answers for mails to one recipient, used before ``script``.
    by_recipient: dict[str, deque[str]] = field(default_factory=dict)
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    data_commands: int = 0
    in_data: threading.Event = field(default_factory=threading.Event)
    # When set to an Event, DATA is answered only once the test sets it; with
    # `gate_helo`, only DATA of sessions that sent that EHLO name waits.
    # (A client gone meanwhile cancels the answer: nothing is recorded.)
    gate: threading.Event | None = None
    gate_helo: str = ""
    gated: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Relay behaviour: 421 at the greeting to every k-th connection (0: never), and
    # to any connection past `max_connections` open at once (0: no cap).
    refuse_every: int = 0
    max_connections: int = 0
    # Connection number -> seconds before each answer to EHLO, MAIL, RCPT and DATA.
    slow_connections: dict[int, float] = field(default_factory=dict)
    sessions: list[Session] = field(default_factory=list)
    peak_open: int = 0
    # Offer PIPELINING (RFC 2920) in the EHLO answer. aiosmtpd reads a command at a
    # time from its buffer, so it answers a pipelined group in order anyway.
    pipelining: bool = False
    # MAIL commands that arrived with their RCPT already behind them in the
    # server's buffer: the client did pipeline.
    pipelined_envelopes: int = 0

    def admit(self) -> Session:
        """A new connection: its Session, ``refused`` when it gets 421 at once."""
        with self.lock:
            session = Session(number=len(self.sessions) + 1)
            open_now = sum(1 for s in self.sessions if s.open and not s.refused)
            session.refused = bool(
                (self.refuse_every and session.number % self.refuse_every == 0)
                or (self.max_connections and open_now >= self.max_connections)
            )
            self.sessions.append(session)
            if not session.refused:
                self.peak_open = max(self.peak_open, open_now + 1)
            return session

    def closed(self, session: Session) -> None:
        with self.lock:
            session.open = False

    async def _slow(self, server: Any) -> None:
        delay = self.slow_connections.get(server.relay_session.number)
        if delay:
            await asyncio.sleep(delay)  # a slow relay is the fault injected: not a wait

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        await self._slow(server)
        with self.lock:
            server.relay_session.helo = hostname
        session.host_name = hostname
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        await self._slow(server)
        if b"RCPT TO" in bytes(getattr(server._reader, "_buffer", b"")):
            with self.lock:
                self.pipelined_envelopes += 1
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        await self._slow(server)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.in_data.set()
        await self._slow(server)
        if self.gate is not None and self.gate_helo in ("", server.relay_session.helo):
            with self.lock:
                self.gated += 1
            await asyncio.to_thread(self.gate.wait, 60)
        if self.delay:
            await asyncio.sleep(self.delay)  # a slow relay is the fault injected: not a wait
        with self.lock:
            self.data_commands += 1
            own = self.by_recipient.get(envelope.rcpt_tos[0]) if envelope.rcpt_tos else None
            queue = own or self.script
            action = queue.popleft() if queue else "250 OK"
            if action.startswith("250"):
                server.relay_session.mails += 1
            if action == DROP or action.startswith("250"):
                self.received.append(
                    Received(
                        mail_from=envelope.mail_from,
                        rcpt_tos=tuple(envelope.rcpt_tos),
                        raw=envelope.original_content,
                        accepted=action != DROP,
                    )
                )
        if action == DROP:
            server.transport.close()
            return "250 OK"  # never reaches the client
        return action


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP that lets the handler refuse a connection at the greeting
    (421, then close), as a relay at its connection limit does."""

    relay_session: Session

    async def _handle_client(self) -> None:
        handler: ScriptedHandler = self.event_handler
        self.relay_session = handler.admit()
        try:
            if self.relay_session.refused:
                await self.push("421 4.7.0 Too many connections, try again later")
                self.transport.close()
                return
            await super()._handle_client()
        finally:
            handler.closed(self.relay_session)


class RelayController(Controller):
    def factory(self) -> SMTP:
        return RelaySMTP(self.handler, **self.SMTP_kwargs)


@dataclass
class SmtpServer:
    port: int
    handler: ScriptedHandler

    @property
    def sessions(self) -> list[Session]:
        """Every connection so far, refused ones included (copies)."""
        with self.handler.lock:
            return [replace(s) for s in self.handler.sessions]

    @property
    def received(self) -> list[Received]:
        with self.handler.lock:
            return list(self.handler.received)

    @property
    def data_commands(self) -> int:
        with self.handler.lock:
            return self.handler.data_commands

    def answer(self, *actions: str) -> None:
        """Queue answers for the next DATA commands."""
        with self.handler.lock:
            self.handler.script.extend(actions)

    def answer_for(self, recipient: str, *actions: str) -> None:
        """Queue answers for the next DATA commands of mails to ``recipient``."""
        with self.handler.lock:
            self.handler.by_recipient.setdefault(recipient, deque()).extend(actions)

    def message_ids(self) -> list[str]:
        return [r.message_id for r in self.received]


# For a test to run against both ways the worker's client talks:
#     @BOTH_WAYS
#     async def test_x(smtp_server: SmtpServer, ...)
BOTH_WAYS = pytest.mark.parametrize(
    "smtp_server", [False, True], ids=["lockstep", "pipelining"], indirect=True
)


@pytest.fixture
def smtp_server(request: pytest.FixtureRequest) -> Iterator[SmtpServer]:
    """Offers PIPELINING when parametrized with True (``BOTH_WAYS``)."""
    with running_smtp_server(pipelining=getattr(request, "param", False)) as server:
        yield server


@contextlib.contextmanager
def running_smtp_server(*, pipelining: bool = False) -> Iterator[SmtpServer]:
    handler = ScriptedHandler(pipelining=pipelining)
    port = free_port()
    controller = RelayController(handler, hostname="127.0.0.1", port=port)
    controller.start()
    with handler.lock:  # start() made a connection of its own to see the server up
        handler.sessions.clear()
    try:
        yield SmtpServer(port=port, handler=handler)
    finally:
        controller.stop()


@pytest.fixture
def mail_sink(tmp_path: Path) -> Iterator[MailSink]:
    with running_sink(tmp_path) as sink:
        yield sink


@pytest.fixture
def mail_sink_tls(tmp_path: Path) -> Iterator[MailSink]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a certificate")
    with running_sink(tmp_path, tls=True) as sink:
        yield sink


@pytest.fixture
async def mail_redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def mail_settings(redis_server: RedisServer, smtp_server: SmtpServer) -> MailSettings:
    settings = MailSettings(
        redis_url=redis_server.url,
        smtp_host="127.0.0.1",
        smtp_port=smtp_server.port,
        smtp_timeout=1.4,
        mail_from="PhoneShop <orders@phoneshop.test>",
        mail_domain="phoneshop.test",
        max_attempts=5,
        backoff_base=0.05,
        backoff_max=0.2,
        claim_idle=3.0,
        # One lane unless a test asks for more: most tests read the order of arrival.
        concurrency=1,
        batch_size=50,
        events_retention=3600.0,
        trim_interval=0.2,
        heartbeat=1.0,
        heartbeat_log=60.0,
        worker_name="test-worker",
    )
    settings.validate()
    return settings


def settings_env(settings: MailSettings, **extra: str) -> dict[str, str]:
    """The environment that makes ``python -m mail`` read ``settings``."""
    env = clean_env(
        REDIS_URL=settings.redis_url,
        SMTP_HOST=settings.smtp_host,
        SMTP_PORT=str(settings.smtp_port),
        SMTP_TLS=settings.smtp_tls,
        SMTP_TIMEOUT_SECONDS=str(settings.smtp_timeout),
        MAIL_FROM=settings.mail_from,
        MAIL_DOMAIN=settings.mail_domain,
        MAIL_MAX_ATTEMPTS=str(settings.max_attempts),
        MAIL_BACKOFF_BASE_SECONDS=str(settings.backoff_base),
        MAIL_BACKOFF_MAX_SECONDS=str(settings.backoff_max),
        MAIL_CLAIM_IDLE_SECONDS=str(settings.claim_idle),
        MAIL_CONCURRENCY=str(settings.concurrency),
        MAIL_MAX_PER_CONNECTION=str(settings.max_per_connection),
        MAIL_IDLE_TIMEOUT_SECONDS=str(settings.idle_timeout),
        MAIL_HELO_NAME=settings.helo_name,
        MAIL_METRICS_PORT=str(settings.metrics_port),
        MAIL_BATCH_SIZE=str(settings.batch_size),
        EVENTS_RETENTION_SECONDS=str(settings.events_retention),
        EVENTS_TRIM_INTERVAL_SECONDS=str(settings.trim_interval),
        MAIL_HEARTBEAT_SECONDS=str(settings.heartbeat),
        MAIL_WORKER_NAME=settings.worker_name,
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


def unblock_reads(redis_url: str) -> int:
    """End every XREADGROUP blocked in Redis as its timeout would (CLIENT UNBLOCK): a
    stopping worker notices the stop when its read ends, which is otherwise up to
    mail/worker.py's MAX_BLOCK_MS later. A worker that keeps running just reads
    again. How many reads were ended."""
    with SyncRedis.from_url(redis_url) as admin:
        blocked = [
            c["id"] for c in admin.client_list() if c["cmd"] == "xreadgroup" and "b" in c["flags"]
        ]
        return sum(admin.client_unblock(client) for client in blocked)


@dataclass
class WorkerPool:
    """MailWorkers running as tasks of the test's loop."""

    settings: MailSettings
    running: list[tuple[MailWorker, asyncio.Task, Redis]] = field(default_factory=list)

    async def start(self, **changes: Any) -> MailWorker:
        settings = replace(self.settings, **changes)
        settings.validate()
        redis = Redis.from_url(settings.redis_url, decode_responses=True)
        worker = MailWorker(settings, redis)
        task = asyncio.create_task(worker.run(), name=f"mail-worker-{settings.worker_name}")
        self.running.append((worker, task, redis))
        return worker

    async def stop(self, worker: MailWorker) -> None:
        for entry in list(self.running):
            if entry[0] is worker:
                _, task, redis = entry
                worker.stop()

                async def stopped(task: asyncio.Task = task) -> bool:
                    await asyncio.to_thread(unblock_reads, self.settings.redis_url)
                    return task.done()

                await wait_until_async(stopped, f"mail worker {worker.name} to stop", 30)
                await task
                await redis.aclose()
                self.running.remove(entry)

    async def stop_all(self) -> None:
        for worker, *_ in list(self.running):
            await self.stop(worker)


@pytest.fixture
async def mail_workers(mail_settings: MailSettings, mail_redis: Redis) -> AsyncIterator[WorkerPool]:
    pool = WorkerPool(mail_settings)
    try:
        yield pool
    finally:
        await pool.stop_all()


@dataclass
class ProcessPool:
    settings: MailSettings
    log_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, name: str, **changes: Any) -> subprocess.Popen:
        settings = replace(self.settings, worker_name=name, **changes)
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            mail_argv(),
            cwd=ROOT,
            env=settings_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        """SIGTERM to every worker at once, each blocked read ended, then each waited for."""
        running = [proc for proc in self.procs if proc.poll() is None]
        for proc in running:
            proc.terminate()

        def stopped() -> bool:
            unblock_reads(self.settings.redis_url)
            return all(proc.poll() is not None for proc in running)

        with contextlib.suppress(TimeoutError):
            wait_until(stopped, "the mail workers to stop", 10)
        for proc in running:
            stop_process(proc, signal.SIGKILL)  # one still running after 10 s


@pytest.fixture
def mail_processes(
    mail_settings: MailSettings, tmp_path: Path, mail_redis: Redis
) -> Iterator[ProcessPool]:
    pool = ProcessPool(mail_settings, tmp_path)
    try:
        yield pool
    finally:
        pool.stop_all()


# Orders as the order scripts leave them, for the mail tests to send.
DOMAIN = "phoneshop.test"
# The partition seeded orders live in unless a test spreads them: its streams and mail
# keys (app/keys.py) are the ones the tests look at.
PARTITION = 5


@dataclass
class SeededOrder:
    order_id: str
    customer_id: str
    email: str
    lines: list[tuple[str, str, int, int]]  # phone id, name, quantity, unit price
    total_cents: int
    balance_cents: int

    @property
    def message_id(self) -> str:
        return f"<order-{self.order_id}@{DOMAIN}>"


_emails = iter(range(10**9))


async def seed_order(
    redis: Redis,
    *,
    name: str = "Ada",
    surname: str = "Lovelace",
    email: str | None = None,
    lines: tuple[tuple[str, int, int], ...] = (("Pixel 9", 1, 79_900),),
    status: str = "completed",
    balance_cents: int = 12_345,
    partition: int | None = None,
) -> SeededOrder:
    """Write the hashes an order's scripts would have written (app/keys.py): the order
    and its customer in ``partition`` (PARTITION unless told), as the app mints them."""
    partition = PARTITION if partition is None else partition
    order_id, customer_id = partitions.new_id(partition), partitions.new_id(partition)
    email = email if email is not None else f"customer{next(_emails)}@example.test"
    seeded = []
    for phone_name, quantity, price in lines:
        phone_id = new_id()
        await redis.hset(keys.phone(phone_id), mapping={"id": phone_id, "name": phone_name})
        seeded.append((phone_id, phone_name, quantity, price))
    total = sum(q * p for _, _, q, p in seeded)
    await redis.hset(
        keys.customer(customer_id),
        mapping={
            "id": customer_id,
            "name": name,
            "surname": surname,
            "email": email,
            "balance_cents": balance_cents,
        },
    )
    await redis.hset(
        keys.order(order_id),
        mapping=stored_order_fields(
            {
                "customer_id": customer_id,
                "status": status,
                "items": ";".join(f"{p}:{q}:{c}" for p, _, q, c in seeded),
                "total_cents": total,
                "seq": 1,
                "created_at": time.time_ns() // 1_000_000,
            }
        ),
    )
    return SeededOrder(order_id, customer_id, email, seeded, total, balance_cents)


def event_fields(event_type: str, order: SeededOrder) -> dict[str, str]:
    """An `events` entry as the order scripts append it (app/keys.py)."""
    status = {"order.placed": "open", "order.cancelled": "cancelled"}.get(event_type, "completed")
    return {
        "type": event_type,
        "order_id": order.order_id,
        "customer_id": order.customer_id,
        "status": status,
        "request_id": "test",
        "at": str(time.time_ns() // 1_000_000),
    }


async def group_idle(redis: Redis) -> bool:
    """Every partition's mailer group has been given every entry and has none pending."""
    async with redis.pipeline(transaction=False) as pipe:
        for partition in range(partitions.PARTITIONS):
            pipe.xinfo_stream(keys.events(partition))
            pipe.xinfo_groups(keys.events(partition))
        replies = await pipe.execute(raise_on_error=False)
    for stream, groups in zip(replies[0::2], replies[1::2], strict=True):
        if isinstance(stream, ResponseError):  # no stream yet: the worker did not start
            return False
        mailer = [g for g in groups if g["name"] == keys.MAIL_GROUP]
        if not mailer or mailer[0]["pending"] != 0:
            return False
        if mailer[0]["last-delivered-id"] != stream["last-generated-id"]:
            return False
    return True
