"""make soak: mixed traffic plus faults on a seeded schedule, then the books.

    python -m loadtests.soak                    # SOAK_SECONDS (300) of it
    SOAK_SECONDS=60 SOAK_SEED=1234 python -m loadtests.soak

A fresh stack on 127.0.0.1 (redis with AOF always, 2 instances, nginx, the mail
worker and the dev SMTP sink) takes order traffic from simulated customers who
retry with their Idempotency-Key, as careful clients do, while a seeded random
schedule kills and restarts Redis, kills an app instance, and stops the SMTP
server for a while. The seed is printed first, so a failing run replays.

At the end: every order a client was told about (201) must be stored with the
status its last acknowledged check or cancel gave it, the audit must hold, and
every completed order must end with a delivered mail or a dead letter, nothing
pending. One summary is printed; the exit status is non-zero when anything
acknowledged is missing or an invariant failed. Bounded in time and count.

While it runs, a line every PROGRESS_SECONDS (5 s) says the phase, the time
elapsed, the orders acknowledged and the faults injected so far, through the
checks and the wait for mail too. The summary and that timeline are written to
``loadtests/reports/SOAK.md``, beside make bench's BENCH.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from redis.asyncio import Redis

from app import keys
from app.env import SettingsError, env_float, env_int
from app.ops.instances import mail_sink_argv
from app.partitions import PARTITIONS
from app.vocabulary import COMPLETED, ORDER_STATUSES
from loadtests.stack import ROOT, LoadStack, launch
from loadtests.support.servers import clean_env, stop_process, wait_for_port

CUSTOMERS = 16
PHONES = 5
TIMEOUT = aiohttp.ClientTimeout(total=15)
SETTLE_SECONDS = 180
# How often a progress line is printed: "at least every 10 s" with room to spare.
PROGRESS_SECONDS = 5.0
REPORTS = ROOT / "loadtests" / "reports"
# Every soak customer stays far below the write limit; reads get room.
SOAK_LIMITS = {"LIMIT_READ_RATE": "5000r/s", "LIMIT_READ_BURST": "10000", "REDIS_TIMEOUT": "1"}


@dataclass
class Books:
    """What clients were told, to hold the stored state against."""

    answers: Counter = field(default_factory=Counter)
    expected_status: dict[str, str] = field(default_factory=dict)  # order id -> status
    acknowledged: int = 0
    faults: Counter = field(default_factory=Counter)


@dataclass
class Progress:
    """The phase the soak is in, printed with the books every PROGRESS_SECONDS."""

    books: Books
    seconds: float
    started: float = field(default_factory=time.monotonic)
    phase: str = "starting the stack"
    timeline: list[str] = field(default_factory=list)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        faults = sum(self.books.faults.values())
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(self.books.faults.items()))
        refused = sum(
            count
            for answer, count in self.books.answers.items()
            if answer.startswith("POST /orders ") and not answer.endswith(" 201")
        )
        return (
            f"{elapsed:5.0f} s  {self.phase:<22} orders {self.books.acknowledged:>6} "
            f"(other answers to POST /orders {refused})  faults {faults}"
            + (f" ({kinds})" if kinds else "")
        )

    def tick(self) -> None:
        line = self.line()
        self.timeline.append(line)
        print(f"soak: {line}", flush=True)

    async def report_every(self, interval: float = PROGRESS_SECONDS) -> None:
        while True:
            await asyncio.sleep(interval)  # the progress line's period: pacing
            self.tick()


async def request(
    session: aiohttp.ClientSession, method: str, url: str, **kwargs
) -> tuple[int, dict]:
    try:
        async with session.request(method, url, **kwargs) as response:
            text = await response.text()
            return response.status, json.loads(text) if text.startswith("{") else {}
    except (TimeoutError, aiohttp.ClientError):
        return 0, {}


async def until_answered(
    session: aiohttp.ClientSession, method: str, url: str, stop_at: float, **kwargs
) -> tuple[int, dict]:
    """Retry while the answer is 'not now' (no answer, 5xx, 429), as a client would."""
    while True:
        status, body = await request(session, method, url, **kwargs)
        if status and status < 500 and status != 429:
            return status, body
        if time.monotonic() > stop_at:
            return status, body
        await asyncio.sleep(0.2)  # a client's back-off between tries: pacing


async def customer_life(
    session: aiohttp.ClientSession,
    url: str,
    token: str,
    phones: list[str],
    books: Books,
    rng: random.Random,
    end: float,
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    give_up = end + 60  # a key is retried past the end, until answered
    while time.monotonic() < end:
        roll = rng.random()
        if roll < 0.3:
            status, _ = await request(session, "GET", f"{url}/phones?page={rng.randint(1, 2)}")
            books.answers[f"GET /phones {status}"] += 1
            continue
        autocheck = rng.random() < 0.6
        body = {
            "items": [{"phone_id": rng.choice(phones), "quantity": rng.randint(1, 3)}],
            "autocheck": autocheck,
        }
        key_headers = {**headers, "Idempotency-Key": uuid.uuid4().hex}
        status, answer = await until_answered(
            session, "POST", f"{url}/orders", give_up, json=body, headers=key_headers
        )
        books.answers[f"POST /orders {status}"] += 1
        if status != 201:
            continue
        order = answer["order"]
        books.acknowledged += 1
        books.expected_status[order["id"]] = order["status"]
        if autocheck:
            continue
        action = "check" if rng.random() < 0.5 else "cancel"
        status, answer = await until_answered(
            session, "POST", f"{url}/orders/{order['id']}/{action}", give_up, headers=headers
        )
        books.answers[f"POST /orders/{{id}}/{action} {status}"] += 1
        if status == 200:
            books.expected_status[order["id"]] = answer["order"]["status"]


@dataclass
class SmtpSink:
    """The dev sink, which the schedule stops and starts again on the same port
    (the stack's clean-up stops whichever process is current)."""

    running: LoadStack

    def stop(self) -> None:
        assert self.running.mail is not None
        stop_process(self.running.mail.sink)

    def start(self) -> None:
        mail = self.running.mail
        assert mail is not None
        env = clean_env(SMTP_PORT=str(mail.smtp_port), MAIL_SINK_DIR=str(mail.sink_dir))
        mail.sink = subprocess.Popen(
            mail_sink_argv(),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(mail.smtp_port, proc=mail.sink)


async def fault_schedule(
    running: LoadStack, sink: SmtpSink, books: Books, rng: random.Random, end: float
) -> None:
    stack = running.stack
    # The sleeps here are the schedule of the faults (when each starts, how long the
    # outage lasts): delays injected on purpose, not waits for a state.
    await asyncio.sleep(rng.uniform(3, 6))
    while time.monotonic() < end - 10:
        fault = rng.choice(["redis", "instance", "smtp"])
        books.faults[fault] += 1
        if fault == "redis":
            stack.kill_redis()
            await asyncio.sleep(rng.uniform(0.5, 2.5))
            stack.start_redis()
        elif fault == "instance":
            index = rng.randrange(len(stack.instances))
            stack.kill_instance(index)
            await asyncio.sleep(rng.uniform(1, 3))
            # Started from this thread (children die with their forking thread).
            stack.instances[index].start(wait=False)
            await asyncio.to_thread(stack.instances[index].wait_healthy)
        else:
            sink.stop()
            await asyncio.sleep(rng.uniform(3, 8))
            sink.start()
        await asyncio.sleep(rng.uniform(6, 14))


async def provision(
    session: aiohttp.ClientSession, running: LoadStack, rng: random.Random
) -> tuple[list[str], list[str]]:
    admin = {"Authorization": f"Bearer {running.admin_token}"}
    phones, tokens = [], []
    for i in range(PHONES):
        status, body = await request(
            session,
            "POST",
            f"{running.direct_url}/phones",
            json={"name": f"soak {i}", "price_cents": rng.randint(100, 5000), "stock": 2000},
            headers=admin,
        )
        assert status == 201, body
        phones.append(body["phone"]["id"])
    for _ in range(CUSTOMERS):
        status, body = await request(
            session,
            "POST",
            f"{running.direct_url}/customers",
            json={
                "name": "Soak",
                "surname": "Er",
                "email": f"{uuid.uuid4().hex}@example.com",
                # Some run out of money on purpose.
                "balance_cents": rng.choice([50_000, 10**6, 10**8]),
            },
            headers=admin,
        )
        assert status == 201, body
        tokens.append(body["token"])
    return phones, tokens


async def settle_mail(redis: Redis, completed: list[str]) -> tuple[int, int, int]:
    """Wait until every completed order is mailed or dead-lettered; (sent, dead, pending)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        dead_ids = set()
        for partition in range(PARTITIONS):
            dead_ids |= {f["order_id"] for _, f in await redis.xrange(keys.mail_dead(partition))}
        sent = 0
        for order_id in completed:
            sent += await redis.exists(keys.mail_sent(order_id))
        dead = len([o for o in completed if o in dead_ids])
        pending = 0
        for partition in range(PARTITIONS):
            groups = await redis.xinfo_groups(keys.events(partition))
            pending += sum(g["pending"] for g in groups if g["name"] == keys.MAIL_GROUP)
        if (sent + dead == len(completed) and pending == 0) or time.monotonic() > deadline:
            return sent, dead, pending
        await asyncio.sleep(1)  # polling the mail books, bounded by the deadline


async def soak(seconds: float, seed: int) -> int:
    books = Books()
    progress = Progress(books, seconds)
    reporter = asyncio.create_task(progress.report_every())
    try:
        return await _soak(seconds, seed, books, progress)
    finally:
        reporter.cancel()


async def _soak(seconds: float, seed: int, books: Books, progress: Progress) -> int:
    rng = random.Random(seed)
    # The stack starts in a thread, so that progress lines keep coming meanwhile.
    stack = launch(mail=True, env=SOAK_LIMITS, instances=2, workers=1)
    running = await asyncio.to_thread(stack.__enter__)
    try:
        result = await _traffic_and_books(seconds, seed, books, progress, rng, running)
    finally:
        progress.phase = "stopping the stack"
        await asyncio.to_thread(stack.__exit__, None, None, None)
    return result


async def _traffic_and_books(
    seconds: float,
    seed: int,
    books: Books,
    progress: Progress,
    rng: random.Random,
    running: LoadStack,
) -> int:
    sink = SmtpSink(running)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        progress.phase = "provisioning"
        phones, tokens = await provision(session, running, rng)
        progress.phase = f"traffic + faults ({seconds:.0f} s)"
        end = time.monotonic() + seconds
        faults = asyncio.create_task(fault_schedule(running, sink, books, rng, end))
        await asyncio.gather(
            *(
                customer_life(
                    session,
                    running.http_url,
                    token,
                    phones,
                    books,
                    random.Random(rng.random()),
                    end,
                )
                for token in tokens
            )
        )
        await faults
        progress.phase = "checking every order"
        running.stack.heal()
        admin = {"Authorization": f"Bearer {running.admin_token}"}
        missing, wrong_status = [], []
        for order_id, expected in books.expected_status.items():
            status, body = await until_answered(
                session,
                "GET",
                f"{running.direct_url}/orders/{order_id}",
                time.monotonic() + 30,
                headers=admin,
            )
            if status != 200:
                missing.append(order_id)
            elif body["order"]["status"] != expected:
                wrong_status.append(order_id)
        _, audit = await until_answered(
            session,
            "GET",
            f"{running.direct_url}/admin/audit",
            time.monotonic() + 30,
            headers=admin,
        )
    progress.phase = "waiting for the mail"
    redis = Redis.from_url(running.redis_url, decode_responses=True)
    try:
        completed = [o for o, s in books.expected_status.items() if s == COMPLETED]
        sent, dead, pending = await settle_mail(redis, completed)
        # Every status list's chunks (app/keys.py), from their directories.
        lists = [(p, status) for p in range(PARTITIONS) for status in ORDER_STATUSES]
        async with redis.pipeline(transaction=False) as pipe:
            for p, status in lists:
                pipe.zrange(keys.order_chunks(p, status), 0, -1)
            directories = await pipe.execute()
        async with redis.pipeline(transaction=False) as pipe:
            for (p, status), chunks in zip(lists, directories, strict=True):
                for chunk in chunks:
                    pipe.zcard(keys.orders_by_status(p, status, int(chunk)))
            stored = sum(await pipe.execute())
    finally:
        await redis.aclose()
    ok = not missing and not wrong_status and audit.get("ok") is True and pending == 0
    ok = ok and sent + dead == len(completed)
    summary = [
        f"soak summary (seed {seed}, {seconds:.0f} s)",
        f"  orders acknowledged   {books.acknowledged}",
        f"  orders found          {books.acknowledged - len(missing)} (stored in all: {stored})",
        f"  missing               {len(missing)}  wrong status {len(wrong_status)}",
        f"  audit                 ok={audit.get('ok')} stock={audit.get('stock', {}).get('ok')} "
        f"money={audit.get('money', {}).get('ok')}",
        f"  mails                 delivered {sent}, dead-lettered {dead}, pending {pending} "
        f"(of {len(completed)} completed orders)",
        f"  faults injected       {dict(books.faults)}",
        f"  answers               {dict(sorted(books.answers.items()))}",
        f"  verdict               {'OK' if ok else 'FAILED'}",
    ]
    print("\n".join(["", *summary]), flush=True)
    path = write_report(summary, progress.timeline, seed)
    print(f"soak: report written to {path.relative_to(ROOT)}", flush=True)
    return 0 if ok else 1


def write_report(summary: list[str], timeline: list[str], seed: int) -> Path:
    """loadtests/reports/SOAK.md: the summary, then the progress lines of the run."""
    REPORTS.mkdir(parents=True, exist_ok=True)
    path = REPORTS / "SOAK.md"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"# make soak, {stamp}",
        "",
        f"Replay with `SOAK_SEED={seed} make soak`. Written by loadtests/soak.py.",
        "",
        "```",
        *summary,
        "```",
        "",
        f"## Progress (every {PROGRESS_SECONDS:.0f} s: elapsed, phase, orders acknowledged, faults)",
        "",
        "```",
        *timeline,
        "```",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


def main() -> int:
    try:
        seconds = env_float(os.environ, "SOAK_SECONDS", 300.0, 10.0, 3600.0)
        seed = env_int(os.environ, "SOAK_SEED", random.SystemRandom().randrange(2**32), 0, 2**63)
    except SettingsError as error:
        print(error, file=sys.stderr)
        return 2
    print(f"soak: seed {seed} (replay with SOAK_SEED={seed}), {seconds:.0f} s", flush=True)
    return asyncio.run(soak(seconds, seed))


if __name__ == "__main__":
    sys.exit(main())
