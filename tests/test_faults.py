"""Faults under load, with the invariants checked afterwards.

One stack of its own (redis with AOF always, 2 instances, nginx, 2 mail
workers, the dev SMTP sink as a process) takes order traffic while Redis is
killed and restarted from its AOF, an instance is killed, a mail worker is
killed and the SMTP server goes away, and Redis is made slow. After each storm:
every order a client was told about (201) is stored with its debit and stock,
the audit holds, and each test prints its figures.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from app import keys
from app.ops.instances import mail_argv, mail_sink_argv
from app.ops.poll import wait_until_async
from app.partitions import PARTITIONS, partition_of
from loadtests.support.servers import clean_env, free_port, stop_process, wait_for_port
from loadtests.support.stack import FullStack, start_full_stack
from tests.helpers import all_events, orders_stored

ROOT = Path(__file__).resolve().parents[1]
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=15)
CHAOS_ENV = {
    "LIMIT_WRITE_RATE": "100000r/s",
    "LIMIT_WRITE_BURST": "100000",
    "LIMIT_READ_RATE": "100000r/s",
    "LIMIT_READ_BURST": "100000",
    "LIMIT_CONN": "5000",
    # Fail fast while Redis is away: a request waits at most this long for it.
    "REDIS_TIMEOUT": "1",
    "MAX_INFLIGHT": "64",
}


@dataclass
class MailSide:
    """The dev SMTP sink and two mail workers, as real processes."""

    redis_url: str
    directory: Path
    smtp_port: int = field(default_factory=free_port)
    sink: subprocess.Popen | None = None
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def mail_dir(self) -> Path:
        return self.directory / "mail"

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(
            REDIS_URL=self.redis_url,
            SMTP_HOST="127.0.0.1",
            SMTP_PORT=str(self.smtp_port),
            SMTP_TIMEOUT_SECONDS="3",
            MAIL_SINK_DIR=str(self.mail_dir),
            # Above twice SMTP_TIMEOUT_SECONDS: a whole send may take half of it.
            MAIL_CLAIM_IDLE_SECONDS="7",
            MAIL_BACKOFF_BASE_SECONDS="0.2",
            MAIL_BACKOFF_MAX_SECONDS="1",
            MAIL_MAX_ATTEMPTS="40",
            PYTHONPATH=str(ROOT),
            **extra,
        )

    def start_sink(self) -> None:
        with (self.directory / "sink.log").open("ab") as log:
            self.sink = subprocess.Popen(
                mail_sink_argv(),
                cwd=ROOT,
                env=self.env(),
                stdout=log,
                stderr=log,
            )
        wait_for_port(self.smtp_port, proc=self.sink)

    def stop_sink(self) -> None:
        if self.sink is not None:
            stop_process(self.sink)
            self.sink = None

    def start_worker(self, name: str) -> None:
        with (self.directory / f"{name}.log").open("ab") as log:
            self.workers[name] = subprocess.Popen(
                mail_argv(),
                cwd=ROOT,
                env=self.env(MAIL_WORKER_NAME=name),
                stdout=log,
                stderr=log,
            )

    def kill_worker(self, name: str) -> None:
        proc = self.workers.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc in self.workers.values():
            stop_process(proc)
        self.workers.clear()
        self.stop_sink()

    def delivered_message_ids(self) -> list[str]:
        ids = []
        for path in sorted(self.mail_dir.glob("*.eml")):
            for line in path.read_text(errors="replace").splitlines():
                if line.lower().startswith("message-id:"):
                    ids.append(line.split(":", 1)[1].strip())
                    break
        return ids


@dataclass
class Chaos:
    stack: FullStack
    mail: MailSide


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chaos]:
    directory = tmp_path_factory.mktemp("chaos")
    with start_full_stack(directory, instances=2, workers=1, env=CHAOS_ENV) as stack:
        mail = MailSide(redis_url=stack.redis.url, directory=directory)
        mail.mail_dir.mkdir()
        mail.start_sink()
        mail.start_worker("chaos-a")
        mail.start_worker("chaos-b")
        try:
            yield Chaos(stack, mail)
        finally:
            mail.stop()


@pytest.fixture
def stack(chaos: Chaos) -> FullStack:
    chaos.stack.heal()
    return chaos.stack


# ---- the shop, driven as clients drive it ---------------------------------------------


async def call(
    session: aiohttp.ClientSession, method: str, url: str, **kwargs
) -> tuple[int, dict, str]:
    async with session.request(method, url, **kwargs) as response:
        text = await response.text()
        body = json.loads(text) if text.startswith("{") else {}
        return response.status, body, response.content_type


async def provision(
    session: aiohttp.ClientSession, stack: FullStack, customers: int, stock: int, price: int = 100
) -> tuple[list[str], list[dict[str, str]]]:
    url, admin = stack.direct_url, stack.admin_headers
    phones = []
    for i in range(3):
        status, body, _ = await call(
            session,
            "POST",
            f"{url}/phones",
            json={"name": f"chaos {i}", "price_cents": price, "stock": stock},
            headers=admin,
        )
        assert status == 201
        phones.append(body["phone"]["id"])
    tokens = []
    for _ in range(customers):
        status, body, _ = await call(
            session,
            "POST",
            f"{url}/customers",
            json={
                "name": "C",
                "surname": "Haos",
                "email": f"{uuid.uuid4().hex}@example.com",
                "balance_cents": 10**8,
            },
            headers=admin,
        )
        assert status == 201
        tokens.append({"Authorization": f"Bearer {body['token']}"})
    return phones, tokens


@dataclass
class Storm:
    """What the clients were told."""

    statuses: Counter = field(default_factory=Counter)
    acked: dict[str, str] = field(default_factory=dict)  # idempotency key -> order id
    keys_by_status: dict[str, int] = field(default_factory=dict)
    problems_503: int = 0
    non_problem_errors: list[str] = field(default_factory=list)
    client_timeouts: int = 0
    connection_errors: int = 0


async def order_storm(
    session: aiohttp.ClientSession,
    url: str,
    phones: list[str],
    tokens: list[dict[str, str]],
    until: asyncio.Event,
    storm: Storm,
    *,
    retry_with_key: bool = False,
) -> None:
    """Each customer places orders until ``until`` is set. With retry_with_key,
    an unanswered or 5xx order is sent again with the same Idempotency-Key
    until it gets a definitive answer, as a careful client does."""

    async def customer(index: int, headers: dict[str, str]) -> None:
        n = 0
        while not until.is_set():
            key = f"{index}-{n}-{uuid.uuid4().hex[:8]}"
            n += 1
            # Open orders: the storms test the books, the mail test the mail.
            body = {
                "items": [{"phone_id": phones[n % len(phones)], "quantity": 1}],
                "autocheck": False,
            }
            while True:
                try:
                    status, answer, content_type = await call(
                        session,
                        "POST",
                        f"{url}/orders",
                        json=body,
                        headers={**headers, "Idempotency-Key": key},
                    )
                except TimeoutError:
                    storm.client_timeouts += 1
                    status, answer, content_type = 0, {}, ""
                except aiohttp.ClientError:
                    storm.connection_errors += 1
                    status, answer, content_type = 0, {}, ""
                storm.statuses[status] += 1
                if status == 201:
                    storm.acked[key] = answer["order"]["id"]
                if status >= 500:
                    if content_type == "application/problem+json":
                        storm.problems_503 += status == 503
                    else:
                        storm.non_problem_errors.append(f"{status} {content_type}")
                definitive = status in (201, 402, 409, 422)
                if definitive or not retry_with_key:
                    break
                await asyncio.sleep(0.05)
                if until.is_set() and status == 0:
                    await asyncio.sleep(0.5)

    await asyncio.gather(*(customer(i, headers) for i, headers in enumerate(tokens)))


async def check_books(session: aiohttp.ClientSession, stack: FullStack, storm: Storm) -> dict:
    """Every acknowledged order is stored, and the audit holds."""
    url, admin = stack.direct_url, stack.admin_headers
    for order_id in storm.acked.values():
        status, body, _ = await call(session, "GET", f"{url}/orders/{order_id}", headers=admin)
        assert status == 200, f"acknowledged order {order_id} is missing"
        assert body["order"]["status"] == "open"
    status, audit, _ = await call(session, "GET", f"{url}/admin/audit", headers=admin)
    assert status == 200 and audit["ok"], audit
    return audit


async def placed_events(redis_url: str) -> set[str]:
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        entries = await all_events(redis)
        return {f["order_id"] for _, f in entries if f["type"] == "order.placed"}
    finally:
        await redis.aclose()


# ---- the faults ----------------------------------------------------------------------


async def test_redis_kill_9_during_orders_loses_nothing_acknowledged(stack: FullStack) -> None:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        phones, tokens = await provision(session, stack, customers=12, stock=10**6)
        redis = Redis.from_url(stack.redis.url, decode_responses=True)
        orders_before = await orders_stored(redis)
        await redis.aclose()
        storm, until = Storm(), asyncio.Event()
        load = asyncio.create_task(
            order_storm(session, stack.http_url, phones, tokens, until, storm)
        )
        kills = 0
        for _ in range(3):
            # Every kill lands while orders flow: some acknowledged since the last restart.
            acked = len(storm.acked)
            await wait_until_async(
                lambda acked=acked: len(storm.acked) >= acked + 10,
                f"orders before kill {kills + 1}",
            )
            problems = storm.problems_503
            await asyncio.to_thread(stack.kill_redis)
            kills += 1
            # ...and the clients see this outage before Redis comes back.
            await wait_until_async(
                lambda problems=problems: storm.problems_503 > problems, f"503s after kill {kills}"
            )
            await asyncio.to_thread(stack.start_redis)
        acked = len(storm.acked)
        await wait_until_async(
            lambda: len(storm.acked) >= acked + 10, "orders after the last restart"
        )
        until.set()
        await load
        audit = await check_books(session, stack, storm)
    stored_events = await placed_events(stack.redis.url)
    assert set(storm.acked.values()) <= stored_events  # an event for every stored order
    print(
        f"\nredis kill -9 x{kills}: {len(storm.acked)} orders acknowledged, all found; "
        f"answers {dict(storm.statuses)}; 503 problems {storm.problems_503}; "
        f"client time-outs {storm.client_timeouts}; orders stored {audit['orders']['total'] - orders_before}; audit ok"
    )
    assert storm.problems_503 > 0, "the outage was never seen"
    assert storm.client_timeouts == 0, "a request hung past the client's timeout"
    assert storm.non_problem_errors == []
    assert set(storm.statuses) <= {201, 503}
    assert len(storm.acked) > 0


async def test_instance_kill_9_with_idempotent_retries(stack: FullStack) -> None:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        phones, tokens = await provision(session, stack, customers=10, stock=10**6)
        storm, until = Storm(), asyncio.Event()
        load = asyncio.create_task(
            order_storm(session, stack.http_url, phones, tokens, until, storm, retry_with_key=True)
        )
        await asyncio.sleep(1.5)
        await asyncio.to_thread(stack.kill_instance, 0)
        await asyncio.sleep(2.0)
        # Started from this thread: the child dies with the thread that forked
        # it (PR_SET_PDEATHSIG), and asyncio's executor threads end with the loop.
        stack.instances[0].start(wait=False)
        await asyncio.to_thread(stack.instances[0].wait_healthy)
        await asyncio.sleep(1.5)
        until.set()
        await load
        await check_books(session, stack, storm)
        # At most one order per key: each customer's stored orders are exactly
        # the distinct orders its keys were answered with.
        stored = 0
        for headers in tokens:
            status, body, _ = await call(
                session, "GET", f"{stack.direct_url}/orders?per_page=100", headers=headers
            )
            assert status == 200
            stored += body["total"]
    print(
        f"\ninstance kill -9: {len(storm.acked)} keys acknowledged, {stored} orders stored; "
        f"answers {dict(storm.statuses)}; connection errors {storm.connection_errors}"
    )
    assert len(set(storm.acked.values())) == len(storm.acked)
    assert stored == len(storm.acked)
    assert storm.client_timeouts == 0


async def test_mail_worker_kill_and_smtp_outage_end_in_mail_or_dead_letter(
    chaos: Chaos, stack: FullStack
) -> None:
    mail = chaos.mail
    redis = Redis.from_url(stack.redis.url, decode_responses=True)
    try:
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            phones, tokens = await provision(session, stack, customers=5, stock=10**6)
            completed: list[str] = []
            # The sink is the module's: count only what arrives from here on.
            delivered_before = Counter(mail.delivered_message_ids())

            async def place(count: int) -> None:
                for i in range(count):
                    headers = tokens[i % len(tokens)]
                    status, body, _ = await call(
                        session,
                        "POST",
                        f"{stack.direct_url}/orders",
                        json={"items": [{"phone_id": phones[0], "quantity": 1}]},
                        headers=headers,
                    )
                    assert status == 201
                    completed.append(body["order"]["id"])

            await place(20)
            mail.kill_worker("chaos-a")  # mid-batch, perhaps holding pending mail
            mail.stop_sink()  # and the SMTP server goes away
            await place(20)
            await asyncio.sleep(3)
            mail.start_sink()
            mail.start_worker("chaos-a")
            await place(10)

        async def settled() -> bool:
            for order_id in completed:
                if not await redis.exists(keys.mail_sent(order_id)):
                    dead = await redis.xrange(keys.mail_dead(partition_of(order_id)))
                    if order_id not in {f["order_id"] for _, f in dead}:
                        return False
            for partition in range(PARTITIONS):
                groups = await redis.xinfo_groups(keys.events(partition))
                if any(g["pending"] for g in groups if g["name"] == keys.MAIL_GROUP):
                    return False
            return True

        await wait_until_async(settled, "no mail pending", 90, interval=0.2)
        sent = [o for o in completed if await redis.exists(keys.mail_sent(o))]
        dead = sum([await redis.xlen(keys.mail_dead(p)) for p in range(PARTITIONS)])
    finally:
        await redis.aclose()
    ours = {f"<order-{o}@phoneshop.localhost>" for o in completed}
    arrived = Counter(mail.delivered_message_ids()) - delivered_before
    delivered = [m for m in arrived.elements() if m in ours]
    expected = {f"<order-{o}@phoneshop.localhost>" for o in sent}
    print(
        f"\nmail: {len(completed)} completed orders, {len(sent)} delivered, {dead} dead-lettered, "
        f"{len(delivered)} .eml files ({len(delivered) - len(set(delivered))} duplicates, same Message-ID)"
    )
    assert expected <= set(delivered)
    # No mail for anything but this test's completed orders.
    assert set(arrived) <= ours, set(arrived) - ours


async def test_slow_redis_fails_fast_and_recovers(stack: FullStack) -> None:
    instance = stack.instance_urls[1]
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        phones, _ = await provision(session, stack, customers=1, stock=10)
        sleeper = asyncio.create_task(asyncio.to_thread(stack.redis.cli, "DEBUG", "SLEEP", "4"))

        async def asleep() -> bool:
            probe = Redis.from_url(stack.redis.url, socket_timeout=0.1)
            try:
                await probe.ping()
                return False
            except RedisTimeoutError:
                return True
            finally:
                await probe.aclose()

        await wait_until_async(asleep, "Redis never went to sleep", 10)
        started = time.monotonic()
        answers = await asyncio.gather(
            *(call(session, "GET", f"{instance}/phones/{phones[0]}") for _ in range(150)),
            return_exceptions=True,
        )
        during = time.monotonic() - started
        await sleeper
        recovered, _, _ = await call(session, "GET", f"{instance}/phones/{phones[0]}")
    failures = [a for a in answers if isinstance(a, BaseException)]
    codes = Counter(a[1].get("code") for a in answers if not isinstance(a, BaseException))
    print(
        f"\nslow redis: 150 reads in {during:.1f}s while Redis slept 4 s: {dict(codes)}; after: {recovered}"
    )
    assert failures == []
    assert all(a[0] == 503 and a[2] == "application/problem+json" for a in answers)
    # The in-flight cap (MAX_INFLIGHT=64 on one worker) shed the excess at once;
    # the rest gave up on Redis after REDIS_TIMEOUT.
    assert codes["overloaded"] > 0 and codes["service_unavailable"] > 0
    assert recovered == 200
