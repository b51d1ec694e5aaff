"""Confirmation mails: the worker against a real redis-server and real aiosmtpd
servers (fixtures in tests/mail_fixtures.py). Unit tests seed the order data and
XADD the events directly, following the app/keys.py contract; one test goes
through the aiohttp app. No timing assertions: conditions are awaited with
generous deadlines.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import threading
import urllib.request
from dataclasses import replace
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

import mail.worker
from app import keys, partitions
from app.admin.mail import list_dead_letters, requeue_dead_letter
from app.fastredis import MultiplexedRedis
from app.mail_backlog import count_after, read_mail_backlog
from app.ops.instances import mail_argv
from app.ops.poll import wait_until_async
from app.partitions import new_id, partition_of
from app.settings import SettingsError
from app.vocabulary import ORDER_FIELDS
from loadtests.support.mail_sink import MailSink
from loadtests.support.servers import RedisServer, free_port, running_redis
from mail.render import HEADERS
from mail.settings import MailSettings, default_worker_name
from mail.smtp_wire import SmtpConnection, SmtpReplyError
from mail.worker import CHUNK, MailWorker
from tests.mail_fixtures import (
    BOTH_WAYS,
    DOMAIN,
    DROP,
    PARTITION,
    ROOT,
    ProcessPool,
    SeededOrder,
    SmtpServer,
    WorkerPool,
    event_fields,
    group_idle,
    seed_order,
    settings_env,
)


async def add_event(redis: Redis, event_type: str, order: SeededOrder) -> str:
    """Appended to the order's partition's stream, as the order scripts do."""
    return await redis.xadd(
        keys.events(partition_of(order.order_id)), event_fields(event_type, order)
    )


async def is_sent(redis: Redis, order: SeededOrder) -> bool:
    return bool(await redis.exists(keys.mail_sent(order.order_id)))


async def all_sent(redis: Redis, orders: list[SeededOrder]) -> bool:
    return sum([await redis.exists(keys.mail_sent(o.order_id)) for o in orders]) == len(orders)


async def dead_letters(redis: Redis) -> list[tuple[str, dict[str, str]]]:
    return await redis.xrange(keys.mail_dead(PARTITION))


async def stream_length_is(redis: Redis, length: int) -> bool:
    return await redis.xlen(keys.events(PARTITION)) == length


def stream_id(value: str) -> tuple[int, int]:
    ms, seq = value.split("-")
    return int(ms), int(seq)


# -- the message -----------------------------------------------------------------------


@BOTH_WAYS
async def test_completed_order_produces_exactly_one_mail(
    mail_redis: Redis, smtp_server: SmtpServer, mail_workers: WorkerPool
) -> None:
    order = await seed_order(
        mail_redis,
        lines=(("Pixel <9> & Co", 2, 79_900), ("Galaxy S25", 1, 99_900)),
        balance_cents=123_45,
    )
    await add_event(mail_redis, "order.placed", order)
    await add_event(mail_redis, "order.completed", order)
    worker = await mail_workers.start()
    await wait_until_async(lambda: group_idle(mail_redis), what="the group to drain")

    [received] = smtp_server.received
    assert received.accepted
    assert received.mail_from == "orders@phoneshop.test"
    assert received.rcpt_tos == (order.email,)
    msg = received.message
    assert tuple(msg.keys()) == HEADERS
    assert msg["Subject"] == f"Your PhoneShop order {order.order_id} is confirmed"
    assert msg["Message-ID"] == order.message_id
    assert [(a.display_name, a.addr_spec) for a in msg["To"].addresses] == [
        ("Ada Lovelace", order.email)
    ]
    assert str(msg["From"]) == "PhoneShop <orders@phoneshop.test>"
    text = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    for part in (text, html):
        assert order.order_id in part
        assert "799.00" in part and "999.00" in part  # unit prices
        assert "2,597.00" in part  # total: 2 x 799.00 + 999.00
        assert "123.45" in part  # remaining balance
        assert "Galaxy S25" in part
    assert "2 x Pixel <9> & Co at 799.00 = 1,598.00" in text
    assert "1 x Galaxy S25 at 999.00 = 999.00" in text
    assert "<td>Pixel &lt;9&gt; &amp; Co</td>" in html  # autoescaped
    assert '<td align="right">2</td>' in html
    assert await is_sent(mail_redis, order)
    assert not await mail_redis.exists(keys.mail_attempts(order.order_id))

    # A redelivered event (same order completed "again") is not mailed twice.
    await add_event(mail_redis, "order.completed", order)
    await wait_until_async(lambda: group_idle(mail_redis))
    assert len(smtp_server.received) == 1
    assert worker.stats["duplicates"] == 1
    assert smtp_server.handler.pipelined_envelopes == (1 if smtp_server.handler.pipelining else 0)


async def test_open_order_mails_once_checked_cancelled_never(
    mail_redis: Redis, smtp_server: SmtpServer, mail_workers: WorkerPool
) -> None:
    open_order = await seed_order(mail_redis, status="open")
    cancelled = await seed_order(mail_redis, status="cancelled")
    await add_event(mail_redis, "order.placed", open_order)
    await add_event(mail_redis, "order.placed", cancelled)
    await add_event(mail_redis, "order.cancelled", cancelled)
    worker = await mail_workers.start()
    await wait_until_async(lambda: group_idle(mail_redis))
    assert smtp_server.received == []
    assert worker.stats["ignored"] == 3

    await mail_redis.hset(keys.order(open_order.order_id), ORDER_FIELDS["status"], "completed")
    await add_event(mail_redis, "order.completed", open_order)
    await wait_until_async(lambda: is_sent(mail_redis, open_order))
    await wait_until_async(lambda: group_idle(mail_redis))
    assert smtp_server.message_ids() == [open_order.message_id]
    assert not await is_sent(mail_redis, cancelled)


# -- failures --------------------------------------------------------------------------


async def test_451_k_times_then_accepted_is_delivered_once_without_blocking_others(
    mail_redis: Redis, smtp_server: SmtpServer, mail_workers: WorkerPool
) -> None:
    k = 3
    first = await seed_order(mail_redis)
    second = await seed_order(mail_redis)
    smtp_server.answer_for(first.email, *["451 4.3.0 Try again later"] * k)
    await add_event(mail_redis, "order.completed", first)
    await add_event(mail_redis, "order.completed", second)
    # Backoff of at least 0.5 s: the second mail is sent while the first waits.
    worker = await mail_workers.start(backoff_base=1.0, backoff_max=2.0)
    await wait_until_async(lambda: all_sent(mail_redis, [first, second]))
    await wait_until_async(lambda: group_idle(mail_redis))

    assert smtp_server.message_ids() == [second.message_id, first.message_id]
    assert smtp_server.data_commands == k + 2
    assert worker.stats["retries"] == k
    assert await dead_letters(mail_redis) == []
    assert await mail_redis.zcard(keys.mail_retry(PARTITION)) == 0
    assert not await mail_redis.exists(keys.mail_attempts(first.order_id))


async def test_connection_dropped_after_data_is_delivered_with_one_message_id(
    mail_redis: Redis, smtp_server: SmtpServer, mail_workers: WorkerPool
) -> None:
    smtp_server.answer(DROP)
    order = await seed_order(mail_redis)
    await add_event(mail_redis, "order.completed", order)
    worker = await mail_workers.start()
    await wait_until_async(lambda: is_sent(mail_redis, order))
    await wait_until_async(lambda: group_idle(mail_redis))

    received = smtp_server.received
    # The server got the data twice: once before it hung up, once on the retry.
    assert [r.accepted for r in received] == [False, True]
    assert {r.message_id for r in received} == {order.message_id}
    assert worker.stats["retries"] == 1
    assert await dead_letters(mail_redis) == []


async def test_orders_of_many_partitions_are_mailed_once_each_with_their_own_keys(
    mail_redis: Redis, smtp_server: SmtpServer, mail_workers: WorkerPool
) -> None:
    """One consumer group per partition stream: orders of the first, the last and
    partitions between are each mailed once; their markers and dead letters are in
    their own partition; an entry in a stream other than its order's partition's
    (never written by the order scripts) is dead-lettered, not sent."""
    spread = (0, 1, PARTITION, 63, 127)
    orders = [await seed_order(mail_redis, partition=p) for p in spread]
    await mail_workers.start()
    for order in orders:
        await add_event(mail_redis, "order.completed", order)
    stray = await seed_order(mail_redis, partition=9)
    await mail_redis.xadd(keys.events(10), event_fields("order.completed", stray))
    await wait_until_async(lambda: all_sent(mail_redis, orders))
    await wait_until_async(lambda: group_idle(mail_redis))
    assert sorted(smtp_server.message_ids()) == sorted(o.message_id for o in orders)
    for order, partition in zip(orders, spread, strict=True):
        assert (
            keys.mail_sent(order.order_id) == f"ms{{{partitions.tag(partition)}}}{order.order_id}"
        )
    [(_, letter)] = await mail_redis.xrange(keys.mail_dead(10))
    assert letter["order_id"] == stray.order_id
    assert letter["reason"] == f"order {stray.order_id} is of another partition"
    assert not await is_sent(mail_redis, stray)


async def test_mails_of_several_partitions_read_together_go_as_one_chunk_on_one_session(
    mail_redis: Redis, smtp_server: SmtpServer, mail_workers: WorkerPool
) -> None:
    """A read that finds mails of several partitions makes one chunk of them, sent one
    after the other on one session even with free lanes to spare (a chunk per
    partition cost two round trips and a lane for every mail at a steady rate): each
    mail once, acknowledged in its own stream; the other events and a redelivery are
    acknowledged without a mail."""
    spread = (3, 17, 64, 100, 126)
    orders = [await seed_order(mail_redis, partition=p) for p in spread]
    for order in orders:
        await add_event(mail_redis, "order.placed", order)
        await add_event(mail_redis, "order.completed", order)
    redelivered = await seed_order(mail_redis, partition=90)
    await mail_redis.set(keys.mail_sent(redelivered.order_id), json.dumps({"at": 1}))
    await add_event(mail_redis, "order.completed", redelivered)

    worker = await mail_workers.start(concurrency=8)
    await wait_until_async(lambda: all_sent(mail_redis, orders))
    await wait_until_async(lambda: group_idle(mail_redis))

    assert sorted(smtp_server.message_ids()) == sorted(o.message_id for o in orders)
    assert [s.mails for s in smtp_server.sessions] == [len(orders)]
    assert (worker.stats["ignored"], worker.stats["duplicates"]) == (len(orders), 1)


def test_the_read_window_waits_only_while_mails_come_fast(mail_settings: MailSettings) -> None:
    """A read waits for more mails only while they come at READ_WINDOW_MIN_MAILS per
    READ_WINDOW_S or faster, and never longer than READ_WINDOW_S: a mail on an idle
    worker, or at a trickle, is read as soon as it comes."""
    worker = MailWorker(mail_settings, Redis.from_url(mail_settings.redis_url))
    assert worker._read_window(now=100.0) == 0  # nothing seen yet
    at = 100.0
    for _ in range(20):  # one mail every 50 ms: 20/s
        at += 0.05
        worker._observe_read(at, 1)
    assert worker._read_window(at) == 0
    for _ in range(20):  # 10 mails every 10 ms: 1,000/s
        at += 0.01
        worker._observe_read(at, 10)
    assert 0 < worker._read_window(at) <= mail.worker.READ_WINDOW_S
    # The time since the last read counts: a read that comes late waits no more.
    assert worker._read_window(at + mail.worker.READ_WINDOW_S) <= 0


async def test_a_read_over_many_streams_takes_at_most_a_chunk_of_each(
    mail_redis: Redis, mail_settings: MailSettings
) -> None:
    """COUNT bounds each stream's part of the one XREADGROUP over all the streams, so
    a read takes at most a chunk (a lane's work) of each; the rest stays unread, for
    whichever worker reads next."""
    worker = MailWorker(mail_settings, mail_redis)
    await worker.ensure_group()
    for partition in (2, 40):
        for _ in range(CHUNK + 3):
            order = await seed_order(mail_redis, partition=partition)
            await add_event(mail_redis, "order.completed", order)

    read = await worker._read_new(10 * CHUNK, None)
    await worker.batch.aclose()  # the connection of its reads

    assert sorted((p, len(entries)) for p, entries in read) == [(2, CHUNK), (40, CHUNK)]
    for partition in (2, 40):
        [group] = await mail_redis.xinfo_groups(keys.events(partition))
        assert (group["pending"], group["lag"]) == (CHUNK, 3)


async def test_550_is_dead_lettered_after_one_attempt_and_requeueable(
    mail_redis: Redis, smtp_server: SmtpServer, mail_workers: WorkerPool
) -> None:
    smtp_server.answer("550 5.1.1 No such user here")
    order = await seed_order(mail_redis)
    entry_id = await add_event(mail_redis, "order.completed", order)
    worker = await mail_workers.start()
    await wait_until_async(lambda: mail_redis.xlen(keys.mail_dead(PARTITION)))

    [(dead_id, letter)] = await dead_letters(mail_redis)
    assert letter["order_id"] == order.order_id
    assert letter["customer_id"] == order.customer_id
    assert letter["attempts"] == "1"
    assert letter["event_id"] == entry_id
    assert letter["reason"].startswith("550 5.1.1 No such user here")
    # Acknowledged, not waiting for a retry, not marked sent: nothing will resend it.
    later = await seed_order(mail_redis)
    await add_event(mail_redis, "order.completed", later)
    await wait_until_async(lambda: is_sent(mail_redis, later))
    await wait_until_async(lambda: group_idle(mail_redis))
    assert smtp_server.data_commands == 2
    assert await mail_redis.zcard(keys.mail_retry(PARTITION)) == 0
    assert not await is_sent(mail_redis, order)
    assert worker.stats["dead"] == 1 and worker.stats["retries"] == 0

    total, listed = await list_dead_letters(mail_redis)
    dead_id = f"{PARTITION}.{dead_id}"  # the admin's dead-letter ids name their partition
    assert total == 1 and [d.id for d in listed] == [dead_id]
    requeued = await requeue_dead_letter(mail_redis, dead_id)
    assert requeued is not None and requeued.order_id == order.order_id
    await wait_until_async(lambda: is_sent(mail_redis, order))
    assert smtp_server.message_ids() == [later.message_id, order.message_id]
    assert await mail_redis.xlen(keys.mail_dead(PARTITION)) == 0
    assert await requeue_dead_letter(mail_redis, dead_id) is None  # already requeued


async def test_max_attempts_dead_letters_and_bad_events_do_not_stop_the_worker(
    mail_redis: Redis, smtp_server: SmtpServer, mail_workers: WorkerPool
) -> None:
    smtp_server.answer(*["450 4.2.0 Mailbox temporarily unavailable"] * 3)
    flaky = await seed_order(mail_redis)
    await add_event(mail_redis, "order.completed", flaky)
    ghost = SeededOrder(new_id(PARTITION), new_id(PARTITION), "", [], 0, 0)  # no order hash
    await add_event(mail_redis, "order.completed", ghost)
    await mail_workers.start(max_attempts=3)
    await wait_until_async(lambda: group_idle(mail_redis))

    letters = {f["order_id"]: f for _, f in await dead_letters(mail_redis)}
    assert letters[flaky.order_id]["attempts"] == "3"
    assert letters[flaky.order_id]["reason"].startswith("max attempts reached; last: 450")
    assert letters[ghost.order_id]["reason"] == f"order {ghost.order_id} not found"
    assert smtp_server.data_commands == 3
    assert smtp_server.received == []


# -- header injection ------------------------------------------------------------------


def _b64_word(text: str) -> str:
    return f"=?utf-8?b?{base64.b64encode(text.encode()).decode()}?="


async def test_header_injection_in_name_or_email_adds_no_header_or_recipient(
    mail_redis: Redis, smtp_server: SmtpServer, mail_workers: WorkerPool
) -> None:
    evil = "evil@evil.test"
    names = [
        (f"Eve\r\nBcc: {evil}", "Smith"),
        (f"Eve\nCc: {evil}", "Smith\r\n"),
        (f"=?utf-8?q?=0D=0ABcc:_{evil}?=", _b64_word(f"\r\nBcc: {evil}")),
        (f"Nul\x00Bcc: {evil}", f"\u2028Bcc: {evil}\u0085X-Spam: yes"),
        ('"Quote" <x@evil.test>,', f"{evil}>\r\n\r\nbody"),
    ]
    good = [await seed_order(mail_redis, name=n, surname=s) for n, s in names]
    bad_emails = [
        f"victim@example.test\r\nBcc: {evil}",
        f"victim@example.test\nBcc: {evil}",
        f"victim@example.test\x00{evil}",
        f"victim@example.test, {evil}",
        f"victim@example.test,{evil}",
        f"=?utf-8?q?victim@example.test=0D=0ABcc:_{evil}?=",
        f"Victim <victim@example.test>, {evil}",
        f"victim@example.test>\r\nBcc: <{evil}",
        f"{_b64_word('victim@example.test')}",
    ]
    bad = [await seed_order(mail_redis, email=e) for e in bad_emails]
    for order in good + bad:
        await add_event(mail_redis, "order.completed", order)
    await mail_workers.start()
    await wait_until_async(lambda: all_sent(mail_redis, good))
    await wait_until_async(lambda: group_idle(mail_redis))

    received = smtp_server.received
    assert sorted(r.message_id for r in received) == sorted(o.message_id for o in good)
    by_id = {o.message_id: o for o in good}
    for r in received:
        order = by_id[r.message_id]
        assert r.rcpt_tos == (order.email,)
        header_block = r.raw.split(b"\r\n\r\n", 1)[0]
        starts = [
            line.split(b":", 1)[0]
            for line in header_block.split(b"\r\n")
            if line[:1] not in (b" ", b"\t")
        ]
        assert tuple(s.decode() for s in starts) == HEADERS
        assert b"\x00" not in header_block
        parsed = BytesParser(policy=policy.default).parsebytes(r.raw)
        assert tuple(parsed.keys()) == HEADERS
        assert [a.addr_spec for a in parsed["To"].addresses] == [order.email]
        assert "\n" not in parsed["To"].addresses[0].display_name
    assert all(evil not in rcpt for r in received for rcpt in r.rcpt_tos)

    letters = {f["order_id"]: f for _, f in await dead_letters(mail_redis)}
    assert set(letters) == {o.order_id for o in bad}
    assert all(f["reason"].startswith("invalid recipient") for f in letters.values())
    assert all(f["attempts"] == "0" for f in letters.values())


# -- workers: crashes, parallelism, shutdown ---------------------------------------------


# soak: make test has the kill -9 of a worker with mails in hand in the four-worker test.
@pytest.mark.soak
async def test_worker_killed_mid_batch_another_delivers_everything(
    mail_redis: Redis,
    smtp_server: SmtpServer,
    mail_processes: ProcessPool,
    mail_workers: WorkerPool,
) -> None:
    """A worker killed -9 halfway through a batch: a rescuer started afterwards claims
    what it left pending and delivers everything, at most the mail in hand twice.

    make soak-tests only (about 6 s): make test covers its ground with
    test_four_workers_of_eight_sessions_no_duplicate_and_a_kill_9_loses_nothing[pipelining]
    (a worker killed -9 with mails in hand, the others claim its pending entries, every
    mail delivered, none twice) and, through the whole stack, tests/test_faults.py's
    test_mail_worker_kill_and_smtp_outage_end_in_mail_or_dead_letter."""
    smtp_server.handler.delay = 0.1
    orders = [await seed_order(mail_redis) for _ in range(40)]
    for order in orders:
        await add_event(mail_redis, "order.completed", order)
    victim = mail_processes.start("victim")
    await wait_until_async(lambda: len(smtp_server.received) >= 5, what="the victim to send")
    victim.kill()
    await asyncio.to_thread(victim.wait, 30)
    assert len(smtp_server.received) < len(orders), "the batch must have been cut short"
    pending = await mail_redis.xpending(keys.events(PARTITION), keys.MAIL_GROUP)
    assert pending["pending"] > 0
    assert [c["name"] for c in pending["consumers"]] == ["victim"]

    await mail_workers.start(worker_name="rescuer")
    await wait_until_async(lambda: all_sent(mail_redis, orders), what="every mail")
    await wait_until_async(lambda: group_idle(mail_redis))
    ids = smtp_server.message_ids()
    assert set(ids) == {o.message_id for o in orders}
    # At most the mail in hand when the victim died went out twice (same Message-ID).
    assert len(ids) - len(set(ids)) <= 1


async def test_an_accepted_mail_whose_record_redis_refuses_is_recorded_later_not_sent_again(
    mail_redis: Redis, smtp_server: SmtpServer, mail_workers: WorkerPool, redis_server: RedisServer
) -> None:
    """A cluster failover's window, on one redis-server: the SMTP server takes the mail
    while Redis refuses writes (NOREPLICAS, as a promoted primary does until its replica
    is back). The worker writes the record again until Redis takes it, so the entry,
    idle past the claim timeout by then, is not taken over and sent a second time (it
    was: tests/test_cluster_failover.py saw such duplicates)."""
    handler = smtp_server.handler
    handler.gate = threading.Event()
    order = await seed_order(mail_redis)
    await add_event(mail_redis, "order.completed", order)
    worker = await mail_workers.start()
    await wait_until_async(lambda: handler.in_data.is_set(), what="the mail in hand")
    stream = keys.events(PARTITION)

    async def idle_past_claim_timeout() -> bool:
        # XPENDING is a read: Redis answers it while refusing writes.
        [entry] = await mail_redis.xpending_range(stream, keys.MAIL_GROUP, "-", "+", 1)
        return entry["time_since_delivered"] > worker.settings.claim_idle * 1000

    redis_server.cli("CONFIG", "SET", "min-replicas-to-write", "1")
    try:
        handler.gate.set()
        await wait_until_async(lambda: worker.stats["record_retries"] > 0, what="a refused record")
        await wait_until_async(
            idle_past_claim_timeout, what="the entry idle past the claim timeout"
        )
    finally:
        redis_server.cli("CONFIG", "SET", "min-replicas-to-write", "0")
    await wait_until_async(lambda: is_sent(mail_redis, order), what="the record")
    await wait_until_async(lambda: group_idle(mail_redis), what="nothing pending")
    assert smtp_server.message_ids() == [order.message_id]
    assert worker.stats["sent"] == 1


async def test_two_workers_in_parallel_send_no_duplicates(
    mail_redis: Redis, smtp_server: SmtpServer, mail_processes: ProcessPool
) -> None:
    for name in ("left", "right"):
        mail_processes.start(name, batch_size=5)
    for name in ("left", "right"):
        await wait_until_async(lambda n=name: mail_redis.exists(keys.mail_worker_alive(n)))
    smtp_server.handler.delay = 0.01
    orders = [await seed_order(mail_redis) for _ in range(60)]
    for order in orders:
        await add_event(mail_redis, "order.completed", order)
    await wait_until_async(lambda: all_sent(mail_redis, orders), what="every mail")
    await wait_until_async(lambda: group_idle(mail_redis))
    ids = smtp_server.message_ids()
    assert sorted(ids) == sorted(o.message_id for o in orders)
    consumers = await mail_redis.xinfo_consumers(keys.events(PARTITION), keys.MAIL_GROUP)
    assert {c["name"] for c in consumers} == {"left", "right"}


async def test_sigterm_finishes_the_mail_in_hand_then_exits(
    mail_redis: Redis,
    smtp_server: SmtpServer,
    mail_processes: ProcessPool,
    mail_workers: WorkerPool,
) -> None:
    proc = mail_processes.start("graceful")
    alive = keys.mail_worker_alive("graceful")
    await wait_until_async(lambda: mail_redis.exists(alive), what="the health key")
    assert 0 < await mail_redis.ttl(alive) <= mail_processes.settings.alive_ttl
    check = settings_env(mail_processes.settings, MAIL_WORKER_NAME="graceful")
    health = await asyncio.to_thread(
        subprocess.run,
        mail_argv("--check"),
        cwd=ROOT,
        env=check,
        capture_output=True,
        timeout=30,
    )
    assert health.returncode == 0, health.stdout

    # The server holds the first DATA until the worker has been told to stop.
    gate = smtp_server.handler.gate = threading.Event()
    orders = [await seed_order(mail_redis) for _ in range(5)]
    async with mail_redis.pipeline(transaction=True) as pipe:  # one batch for the worker
        for order in orders:
            pipe.xadd(keys.events(PARTITION), event_fields("order.completed", order))
        await pipe.execute()
    await wait_until_async(lambda: smtp_server.handler.in_data.is_set(), what="a mail in hand")
    proc.send_signal(signal.SIGTERM)
    await wait_until_async(
        lambda: "stopping after the mail in hand" in mail_processes.log("graceful"),
        what="the worker to take the signal",
    )
    gate.set()
    assert await asyncio.to_thread(proc.wait, 30) == 0
    assert smtp_server.message_ids() == [orders[0].message_id]
    assert await is_sent(mail_redis, orders[0])
    # Those read with it stay pending, handed back for takeover (idle past any
    # claim timeout); the rest was never read.
    held = await mail_redis.xpending_range(keys.events(PARTITION), keys.MAIL_GROUP, "-", "+", 10)
    assert held, "the worker reads ahead of its one lane"
    assert all(entry["time_since_delivered"] > 86400_000 for entry in held)
    assert not await mail_redis.exists(alive)
    assert "stopped: sent=1" in mail_processes.log("graceful")
    health = await asyncio.to_thread(
        subprocess.run,
        mail_argv("--check"),
        cwd=ROOT,
        env=check,
        capture_output=True,
        timeout=30,
    )
    assert health.returncode == 1

    # The rest was handed back: another worker sends it without waiting for the
    # claim timeout.
    await mail_workers.start(worker_name="heir", claim_idle=600.0)
    await wait_until_async(lambda: all_sent(mail_redis, orders))
    assert sorted(smtp_server.message_ids()) == sorted(o.message_id for o in orders)


async def test_health_check_finds_a_default_named_worker_of_this_host(
    mail_redis: Redis, mail_workers: WorkerPool
) -> None:
    env = settings_env(mail_workers.settings)
    del env["MAIL_WORKER_NAME"]

    def check() -> int:
        command = mail_argv("--check")
        return subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, timeout=30
        ).returncode

    assert await asyncio.to_thread(check) == 1
    worker = await mail_workers.start(worker_name=default_worker_name())
    await wait_until_async(lambda: mail_redis.exists(keys.mail_worker_alive(worker.name)))
    assert await asyncio.to_thread(check) == 0


async def test_worker_rides_out_a_redis_restart(
    tmp_path: Path, smtp_server: SmtpServer, mail_settings: MailSettings
) -> None:
    with running_redis(tmp_path / "redis") as server:
        pool = WorkerPool(replace(mail_settings, redis_url=server.url))
        redis = Redis.from_url(server.url, decode_responses=True)
        try:
            await pool.start()
            before = await seed_order(redis)
            await add_event(redis, "order.completed", before)
            await wait_until_async(lambda: is_sent(redis, before))

            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)  # same port, data back from the AOF
            await redis.aclose()
            redis = Redis.from_url(server.url, decode_responses=True)
            after = await seed_order(redis)
            await add_event(redis, "order.completed", after)
            await wait_until_async(lambda: is_sent(redis, after), what="a mail after the restart")

            # Even a wiped database (stream and group gone) is taken in stride.
            await redis.flushall()
            last = await seed_order(redis)
            await add_event(redis, "order.completed", last)
            await wait_until_async(lambda: is_sent(redis, last), what="a mail after FLUSHALL")
            assert smtp_server.message_ids() == [
                before.message_id,
                after.message_id,
                last.message_id,
            ]
        finally:
            await pool.stop_all()
            await redis.aclose()


# -- stream retention ------------------------------------------------------------------


async def test_trim_stops_at_the_oldest_entry_any_group_still_needs(
    mail_redis: Redis, mail_settings: MailSettings
) -> None:
    worker = MailWorker(replace(mail_settings, events_retention=0.0), mail_redis)
    await worker.ensure_group()
    ids = [
        await mail_redis.xadd(keys.events(PARTITION), {"type": "order.placed"}) for _ in range(10)
    ]
    await mail_redis.xreadgroup(keys.MAIL_GROUP, "c1", {keys.events(PARTITION): ">"}, count=6)
    await mail_redis.xack(
        keys.events(PARTITION), keys.MAIL_GROUP, ids[0], ids[1], ids[3], ids[4], ids[5]
    )

    assert (await worker.trim_stream(PARTITION))[1] == ids[2]  # the oldest pending
    assert [i for i, _ in await mail_redis.xrange(keys.events(PARTITION))] == ids[2:]

    await mail_redis.xack(keys.events(PARTITION), keys.MAIL_GROUP, ids[2])
    await mail_redis.xgroup_create(keys.events(PARTITION), "laggard", id=ids[3])
    assert (await worker.trim_stream(PARTITION))[1] == ids[3]  # another group's position
    await mail_redis.xgroup_destroy(keys.events(PARTITION), "laggard")
    assert (await worker.trim_stream(PARTITION))[1] == ids[5]  # last delivered; the rest unread
    assert [i for i, _ in await mail_redis.xrange(keys.events(PARTITION))] == ids[5:]

    keeper = MailWorker(mail_settings, mail_redis)  # retention one hour
    await mail_redis.xreadgroup(keys.MAIL_GROUP, "c1", {keys.events(PARTITION): ">"})
    await mail_redis.xack(keys.events(PARTITION), keys.MAIL_GROUP, *ids[6:])
    assert await keeper.trim_events() == 0
    await keeper.batch.aclose()  # its multiplexed connection, which trim_events opened
    await mail_redis.xgroup_destroy(keys.events(PARTITION), keys.MAIL_GROUP)
    assert await worker.trim_stream(PARTITION) == (0, "")  # no mailer group: never trim


async def test_idle_consumers_without_pending_mail_are_pruned(
    mail_redis: Redis, mail_settings: MailSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mail.worker, "PRUNE_IDLE_S", 0.0)
    worker = MailWorker(mail_settings, mail_redis)
    await worker.ensure_group()
    await mail_redis.xadd(keys.events(PARTITION), {"type": "order.placed"})
    await mail_redis.xreadgroup(keys.MAIL_GROUP, "holder", {keys.events(PARTITION): ">"})
    for name in ("gone", mail_settings.worker_name):
        await mail_redis.xgroup_createconsumer(keys.events(PARTITION), keys.MAIL_GROUP, name)
    assert await worker.prune_consumers() == 1
    await worker.batch.aclose()  # its multiplexed connection, which prune_consumers opened
    consumers = await mail_redis.xinfo_consumers(keys.events(PARTITION), keys.MAIL_GROUP)
    assert sorted(c["name"] for c in consumers) == sorted(["holder", mail_settings.worker_name])


async def test_retention_never_trims_unsent_mail_while_the_worker_was_stopped(
    mail_redis: Redis, smtp_server: SmtpServer, mail_workers: WorkerPool
) -> None:
    tiny = {"events_retention": 0.0, "trim_interval": 0.05}
    early = [await seed_order(mail_redis) for _ in range(5)]
    for order in early:
        await add_event(mail_redis, "order.placed", order)
        await add_event(mail_redis, "order.completed", order)
    first = await mail_workers.start(worker_name="before", **tiny)
    await wait_until_async(lambda: all_sent(mail_redis, early))
    await wait_until_async(lambda: group_idle(mail_redis))
    await wait_until_async(lambda: stream_length_is(mail_redis, 1), what="the trim")
    await mail_workers.stop(first)

    # The worker is down while many events arrive: nothing trims them.
    late = [await seed_order(mail_redis) for _ in range(40)]
    for order in late:
        await add_event(mail_redis, "order.placed", order)
        await add_event(mail_redis, "order.completed", order)
    assert await mail_redis.xlen(keys.events(PARTITION)) == 1 + 2 * len(late)
    smtp_server.answer(*["451 4.3.0 Try again later"] * 10)  # some wait for retries

    violations: list[str] = []
    watching = True

    async def watch() -> None:
        """Atomically sample: the stream's first entry is never past a pending one."""
        while watching:
            async with mail_redis.pipeline(transaction=True) as pipe:
                pipe.xpending(keys.events(PARTITION), keys.MAIL_GROUP)
                pipe.xrange(keys.events(PARTITION), "-", "+", count=1)
                summary, head = await pipe.execute()
            if summary["pending"] and stream_id(head[0][0]) > stream_id(summary["min"]):
                violations.append(f"first {head[0][0]} > pending {summary['min']}")
            await asyncio.sleep(0.01)  # the sampling rate of the watcher, not a wait

    watcher = asyncio.create_task(watch())
    await mail_workers.start(worker_name="after", **tiny)
    await wait_until_async(lambda: all_sent(mail_redis, early + late), what="every mail")
    await wait_until_async(lambda: group_idle(mail_redis))
    await wait_until_async(lambda: stream_length_is(mail_redis, 1), what="the final trim")
    watching = False
    await watcher
    assert violations == []
    ids = smtp_server.message_ids()
    assert sorted(ids) == sorted(o.message_id for o in early + late)


# -- the admin endpoints and the app end to end ------------------------------------------


async def test_dead_letter_endpoints_list_and_requeue(
    client, shop, mail_redis: Redis, smtp_server: SmtpServer, mail_workers: WorkerPool
) -> None:
    from tests.helpers import ADMIN

    smtp_server.answer("554 5.7.1 Rejected")
    order = await seed_order(mail_redis)
    await add_event(mail_redis, "order.completed", order)
    await mail_workers.start()
    await wait_until_async(lambda: mail_redis.xlen(keys.mail_dead(PARTITION)))

    response = await client.get("/admin/mail/dead", headers=ADMIN)
    assert response.status == 200
    body = await response.json()
    assert body["total"] == 1 and body["page"] == 1 and body["pageCount"] == 1
    [letter] = body["dead_letters"]
    assert letter["order_id"] == order.order_id
    assert letter["attempts"] == 1
    assert letter["reason"].startswith("554 5.7.1")

    _, customer_auth = await shop.customer()
    assert (await client.get("/admin/mail/dead")).status == 401
    assert (await client.get("/admin/mail/dead", headers=customer_auth)).status == 403
    retry = f"/admin/mail/dead/{letter['id']}/retry"
    assert (await client.post(retry, headers=customer_auth)).status == 403

    response = await client.post(retry, headers=ADMIN)
    assert response.status == 200, await response.text()
    requeued = (await response.json())["requeued"]
    assert requeued["order_id"] == order.order_id and requeued["dead_id"] == letter["id"]
    await wait_until_async(lambda: is_sent(mail_redis, order))
    assert smtp_server.message_ids() == [order.message_id]
    assert (await client.post(retry, headers=ADMIN)).status == 404
    assert (await client.post("/admin/mail/dead/nope/retry", headers=ADMIN)).status == 404
    # Ids past 64 bits would make Redis answer an error: still a plain 404.
    for dead_id in (
        *("710-66078390005239329459", "18446744073709551616-0"),
        *("5.710-66078390005239329459", "5.18446744073709551616-0", "128.1-0"),
    ):
        missing = await client.post(f"/admin/mail/dead/{dead_id}/retry", headers=ADMIN)
        assert missing.status == 404, dead_id
    body = await (await client.get("/admin/mail/dead", headers=ADMIN)).json()
    assert body["dead_letters"] == [] and body["total"] == 0


async def test_orders_placed_through_the_api_are_mailed_once_completed(
    client, shop, mail_redis: Redis, smtp_server: SmtpServer, mail_workers: WorkerPool
) -> None:
    await mail_workers.start()
    phone = await shop.phone(price_cents=50_000, stock=10, name="Fairphone 5")
    customer, auth = await shop.customer(balance_cents=500_000)

    response = await shop.order(auth, [(phone["id"], 2)])  # autocheck: completed at once
    assert response.status == 201, await response.text()
    completed = (await response.json())["order"]
    response = await shop.order(auth, [(phone["id"], 1)], autocheck=False)
    waiting = (await response.json())["order"]
    response = await shop.order(auth, [(phone["id"], 1)], autocheck=False)
    cancelled = (await response.json())["order"]
    assert (await client.post(f"/orders/{cancelled['id']}/cancel", headers=auth)).status == 200

    await wait_until_async(lambda: group_idle(mail_redis))
    assert smtp_server.message_ids() == [f"<order-{completed['id']}@{DOMAIN}>"]
    [received] = smtp_server.received
    assert received.rcpt_tos == (customer["email"],)
    text = received.message.get_body(("plain",)).get_content()
    assert "2 x Fairphone 5 at 500.00 = 1,000.00" in text
    assert "Total: 1,000.00" in text

    assert (await client.post(f"/orders/{waiting['id']}/check", headers=auth)).status == 200
    await wait_until_async(lambda: group_idle(mail_redis))
    assert smtp_server.message_ids() == [
        f"<order-{completed['id']}@{DOMAIN}>",
        f"<order-{waiting['id']}@{DOMAIN}>",
    ]


# -- the dev sink and the settings -------------------------------------------------------


async def test_sink_saves_each_mail_as_an_eml_file(
    mail_sink: MailSink, mail_redis: Redis, mail_workers: WorkerPool
) -> None:
    orders = [await seed_order(mail_redis) for _ in range(3)]
    for order in orders:
        await add_event(mail_redis, "order.completed", order)
    await mail_workers.start(smtp_port=mail_sink.port)
    directory = mail_sink.directory
    await wait_until_async(lambda: len(list(directory.glob("*.eml"))) == 3)
    files = sorted(directory.glob("*.eml"))  # names sort by arrival
    parsed = [BytesParser(policy=policy.default).parsebytes(f.read_bytes()) for f in files]
    assert [m["Message-ID"] for m in parsed] == [o.message_id for o in orders]
    assert list(directory.glob("*.tmp")) == []
    mail_sink.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(mail_sink.proc.wait, 30) == 0


async def test_starttls_to_a_sink_whose_certificate_is_trusted(
    mail_sink_tls: MailSink, mail_redis: Redis, mail_workers: WorkerPool
) -> None:
    order = await seed_order(mail_redis)
    await add_event(mail_redis, "order.completed", order)
    await mail_workers.start(
        smtp_port=mail_sink_tls.port, smtp_tls="starttls", smtp_ca_file=str(mail_sink_tls.cert)
    )
    await wait_until_async(lambda: is_sent(mail_redis, order))
    [saved] = mail_sink_tls.directory.glob("*.eml")
    parsed = BytesParser(policy=policy.default).parsebytes(saved.read_bytes())
    assert parsed["Message-ID"] == order.message_id


async def test_starttls_with_an_untrusted_certificate_is_retried_not_sent(
    mail_sink_tls: MailSink, mail_redis: Redis, mail_workers: WorkerPool
) -> None:
    order = await seed_order(mail_redis)
    await add_event(mail_redis, "order.completed", order)
    worker = await mail_workers.start(smtp_port=mail_sink_tls.port, smtp_tls="starttls")
    await wait_until_async(lambda: worker.stats["retries"] >= 2)
    assert not await is_sent(mail_redis, order)
    assert list(mail_sink_tls.directory.glob("*.eml")) == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SMTP_TLS": "ssl"}, "SMTP_TLS"),
        ({"SMTP_USERNAME": "u"}, "SMTP_PASSWORD"),
        ({"SMTP_PORT": "0"}, "SMTP_PORT"),
        ({"MAIL_FROM": "a@b.c, d@e.f"}, "MAIL_FROM"),
        ({"MAIL_FROM": "PhoneShop <a@b.c>\r\nBcc: x@y.z"}, "MAIL_FROM"),
        ({"MAIL_DOMAIN": "bad domain"}, "MAIL_DOMAIN"),
        ({"MAIL_CLAIM_IDLE_SECONDS": "5", "SMTP_TIMEOUT_SECONDS": "10"}, "MAIL_CLAIM_IDLE"),
        ({"MAIL_BACKOFF_BASE_SECONDS": "10", "MAIL_BACKOFF_MAX_SECONDS": "1"}, "BACKOFF"),
        ({"MAIL_MAX_ATTEMPTS": "nan"}, "MAIL_MAX_ATTEMPTS"),
        ({"MAIL_WORKER_NAME": "a b"}, "MAIL_WORKER_NAME"),
        ({"SMTP_CA_FILE": "/nonexistent/ca.pem"}, "SMTP_CA_FILE"),
    ],
)
def test_settings_reject_bad_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        MailSettings.from_env(env)


def test_settings_defaults_point_at_the_dev_sink() -> None:
    settings = MailSettings.from_env({"SMTP_PASSWORD": ""})
    assert (settings.smtp_host, settings.smtp_port, settings.smtp_tls) == (
        "127.0.0.1",
        1025,
        "none",
    )
    assert settings.from_address.addr_spec == "orders@phoneshop.localhost"
    assert "secret" not in repr(MailSettings(smtp_username="u", smtp_password="secret"))


# -- throughput and a relay's back-pressure (issue 16) -----------------------------------


def accepted_ids(smtp_server: SmtpServer) -> list[str]:
    return [r.message_id for r in smtp_server.received if r.accepted]


@BOTH_WAYS
async def test_relay_throttles_421_every_third_connection_and_451_some_mails(
    mail_redis: Redis, smtp_server: SmtpServer, mail_workers: WorkerPool
) -> None:
    smtp_server.handler.refuse_every = 3
    orders = [await seed_order(mail_redis) for _ in range(40)]
    # More throttles for one mail than MAIL_MAX_ATTEMPTS: a throttle is not an attempt.
    smtp_server.answer_for(orders[0].email, *["451 4.7.1 Rate limited, try again later"] * 4)
    for order in orders[1::7]:
        smtp_server.answer_for(order.email, "451 4.3.0 Try again later")
    for order in orders:
        await add_event(mail_redis, "order.completed", order)
    worker = await mail_workers.start(concurrency=4, max_per_connection=3, max_attempts=2)
    await wait_until_async(lambda: all_sent(mail_redis, orders), what="every mail")
    await wait_until_async(lambda: group_idle(mail_redis))

    ids = accepted_ids(smtp_server)
    assert sorted(ids) == sorted(o.message_id for o in orders)  # each exactly once
    assert await dead_letters(mail_redis) == []
    sessions = smtp_server.sessions
    assert [s.number for s in sessions if s.refused] == [
        n for n in range(1, len(sessions) + 1) if n % 3 == 0
    ]
    assert len([s for s in sessions if s.refused]) >= 3
    assert worker.stats["throttled"] >= 4 + len(orders[1::7])
    assert not await mail_redis.exists(keys.mail_attempts(orders[0].order_id))
    if smtp_server.handler.pipelining:
        assert smtp_server.handler.pipelined_envelopes >= len(orders)


@BOTH_WAYS
async def test_relay_capping_connections_gets_fewer_sessions_and_every_mail(
    mail_redis: Redis, smtp_server: SmtpServer, mail_workers: WorkerPool
) -> None:
    smtp_server.handler.max_connections = 2
    smtp_server.handler.delay = 0.005
    orders = [await seed_order(mail_redis) for _ in range(120)]
    for order in orders:
        await add_event(mail_redis, "order.completed", order)
    worker = await mail_workers.start(concurrency=8, max_per_connection=5)
    await wait_until_async(lambda: all_sent(mail_redis, orders), what="every mail")
    await wait_until_async(lambda: group_idle(mail_redis))

    assert sorted(accepted_ids(smtp_server)) == sorted(o.message_id for o in orders)
    assert await dead_letters(mail_redis) == []
    sessions = smtp_server.sessions
    refused = [s for s in sessions if s.refused]
    served = [s for s in sessions if not s.refused]
    assert refused, "the cap must have been hit"
    assert smtp_server.handler.peak_open <= 2
    # The worker came down to what the relay holds open instead of knocking on
    # with 8 sessions: most of its connections were accepted.
    assert worker.lanes.lowest_limit <= 2
    assert len(refused) < len(served)


# soak: the lockstep run; make test keeps the pipelining one (the same kill -9).
@pytest.mark.parametrize(
    "smtp_server",
    [
        pytest.param(False, id="lockstep", marks=pytest.mark.soak),
        pytest.param(True, id="pipelining"),
    ],
    indirect=True,
)
async def test_four_workers_of_eight_sessions_no_duplicate_and_a_kill_9_loses_nothing(
    mail_redis: Redis, smtp_server: SmtpServer, mail_processes: ProcessPool
) -> None:
    """Four worker processes share 300 mails; one is killed -9 with mails in hand, the
    others claim them: every mail once, none lost.

    The [lockstep] run is make soak-tests only (about 6 s): make test keeps [pipelining],
    the same kill -9 and claim; the lockstep client's own handling of every answer is in
    make test through the other BOTH_WAYS tests (test_completed_order_produces_exactly_one_mail,
    test_relay_throttles_421_every_third_connection_and_451_some_mails,
    test_relay_capping_connections_gets_fewer_sessions_and_every_mail)."""
    handler = smtp_server.handler
    handler.delay = 0.002
    # The victim's DATA waits at the gate, so it is killed with mails in hand.
    handler.gate, handler.gate_helo = threading.Event(), "victim.test"
    names = ["victim", "w2", "w3", "w4"]
    procs = {
        name: mail_processes.start(
            name, concurrency=8, max_per_connection=10, helo_name=f"{name}.test"
        )
        for name in names
    }
    for name in names:
        await wait_until_async(lambda n=name: mail_redis.exists(keys.mail_worker_alive(n)))
    orders = [await seed_order(mail_redis) for _ in range(300)]
    async with mail_redis.pipeline(transaction=False) as pipe:
        for order in orders:
            pipe.xadd(keys.events(PARTITION), event_fields("order.completed", order))
        await pipe.execute()
    await wait_until_async(lambda: handler.gated >= 1, what="the victim mid-send")
    procs["victim"].kill()
    await asyncio.to_thread(procs["victim"].wait, 30)
    handler.gate.set()
    await wait_until_async(lambda: all_sent(mail_redis, orders), seconds=120, what="every mail")
    await wait_until_async(lambda: group_idle(mail_redis))

    ids = accepted_ids(smtp_server)
    assert len(ids) == len(set(ids)), "a Message-ID was delivered twice"
    assert set(ids) == {o.message_id for o in orders}
    assert await dead_letters(mail_redis) == []
    helos = {s.helo for s in smtp_server.sessions if s.mails}
    assert {"w2.test", "w3.test", "w4.test"} <= helos  # the work was shared
    assert max(s.mails for s in smtp_server.sessions) <= 10


# -- a send is never taken over mid-way (issue 13, item 6) -------------------------------


async def test_slow_server_two_workers_never_send_one_mail_twice(
    mail_redis: Redis, smtp_server: SmtpServer, mail_workers: WorkerPool
) -> None:
    # The first connection answers each of EHLO, MAIL, RCPT and DATA after 1.2 s:
    # every command within SMTP_TIMEOUT (1.4 s), the whole send (4.8 s) past
    # MAIL_CLAIM_IDLE_SECONDS (3 s), when the other worker's XAUTOCLAIM may take
    # the entry. The send must give up first, at the deadline (1.5 s).
    smtp_server.handler.slow_connections = {1: 1.2}
    order = await seed_order(mail_redis)
    await add_event(mail_redis, "order.completed", order)
    first = await mail_workers.start(worker_name="first")
    second = await mail_workers.start(worker_name="second")
    await wait_until_async(lambda: is_sent(mail_redis, order))
    await wait_until_async(lambda: group_idle(mail_redis))
    await wait_until_async(lambda: not smtp_server.sessions[0].open, what="the slow session closed")

    assert accepted_ids(smtp_server) == [order.message_id]
    assert smtp_server.sessions[0].mails == 0
    assert first.stats["retries"] + second.stats["retries"] == 1
    assert first.stats["sent"] + second.stats["sent"] == 1
    assert await dead_letters(mail_redis) == []


# -- sessions a stock MTA delivers at once (issue 18, item 1) ---------------------------


async def test_sessions_carry_at_most_max_per_connection_mails_and_the_helo_name(
    mail_redis: Redis, smtp_server: SmtpServer, mail_workers: WorkerPool
) -> None:
    orders = [await seed_order(mail_redis) for _ in range(10)]
    async with mail_redis.pipeline(transaction=False) as pipe:
        for order in orders:
            pipe.xadd(keys.events(PARTITION), event_fields("order.completed", order))
        await pipe.execute()
    await mail_workers.start(
        max_per_connection=3, idle_timeout=0.3, helo_name="mailer.phoneshop.test"
    )
    await wait_until_async(lambda: all_sent(mail_redis, orders))
    # An idle session is closed by the worker, without a mail to send.
    await wait_until_async(
        lambda: not any(s.open for s in smtp_server.sessions), what="idle sessions closed"
    )
    sessions = smtp_server.sessions
    assert [s.mails for s in sessions] == [3, 3, 3, 1]
    assert {s.helo for s in sessions} == {"mailer.phoneshop.test"}

    later = await seed_order(mail_redis)
    await add_event(mail_redis, "order.completed", later)
    await wait_until_async(lambda: is_sent(mail_redis, later))
    assert [s.mails for s in smtp_server.sessions] == [3, 3, 3, 1, 1]


def test_session_settings_default_to_what_a_stock_mta_delivers_at_once() -> None:
    settings = MailSettings.from_env({})
    assert settings.max_per_connection == 10  # exim4: smtp_accept_queue_per_connection
    # More than a stock exim4 takes at once (20): the lanes come down to what the
    # relay holds when it refuses (test_relay_capping_connections_...).
    assert settings.concurrency == 32
    assert settings.ehlo_name not in ("localhost", "localhost.localdomain")
    assert "." in settings.ehlo_name
    named = MailSettings.from_env({"MAIL_HELO_NAME": "[192.0.2.7]"})
    assert named.ehlo_name == "[192.0.2.7]"
    for bad in ("two words", "a_b.example", "[not an address]"):
        with pytest.raises(SettingsError, match="MAIL_HELO_NAME"):
            MailSettings.from_env({"MAIL_HELO_NAME": bad})
    with pytest.raises(SettingsError, match="MAIL_MAX_PER_CONNECTION"):
        MailSettings.from_env({"MAIL_MAX_PER_CONNECTION": "0"})
    with pytest.raises(SettingsError, match="MAIL_CONCURRENCY"):
        MailSettings.from_env({"MAIL_CONCURRENCY": "0"})


# -- the backlog when Redis cannot say the lag (issue 18, item 4) ------------------------


async def test_backlog_counts_undelivered_entries_when_redis_reports_no_lag(
    mail_redis: Redis, mail_settings: MailSettings
) -> None:
    worker = MailWorker(mail_settings, mail_redis)
    await worker.ensure_group()
    orders = [await seed_order(mail_redis) for _ in range(30)]
    ids = []
    for order in orders:
        await add_event(mail_redis, "order.placed", order)
        ids.append(await add_event(mail_redis, "order.completed", order))
    await mail_redis.xreadgroup(keys.MAIL_GROUP, "reader", {keys.events(PARTITION): ">"}, count=4)
    # XDEL of an undelivered entry: Redis can no longer tell the group's lag.
    await mail_redis.xdel(keys.events(PARTITION), ids[5])
    [group] = await mail_redis.xinfo_groups(keys.events(PARTITION))
    assert group["lag"] is None

    backlog = await read_mail_backlog(mail_redis)
    assert backlog is not None
    assert (backlog.undelivered, backlog.exact) == (60 - 4 - 1, True)
    assert backlog.pending == 4
    [(first, _)] = await mail_redis.xrange(keys.events(PARTITION), count=1)
    assert backlog.oldest_ms == int(first.split("-")[0])  # the oldest pending entry
    assert "lag=55 " in backlog.describe(backlog.oldest_ms)
    # The worker's gauges say the same, never 0.
    observer = MailWorker(replace(mail_settings, metrics_port=1), mail_redis)
    await observer._observe_backlog()
    assert REGISTRY.get_sample_value("phoneshop_mail_lag_entries") == 55
    assert REGISTRY.get_sample_value("phoneshop_mail_lag_exact") == 1
    assert REGISTRY.get_sample_value("phoneshop_mail_pending_entries") == 4
    assert REGISTRY.get_sample_value("phoneshop_mail_oldest_waiting_seconds") > 0

    # The count is bounded: past the bound it says "at least".
    stream = keys.events(PARTITION)
    assert await count_after(mail_redis, stream, first, limit=10) == (10, False)
    assert await count_after(mail_redis, stream, first, limit=58) == (58, True)


async def test_workers_sharing_one_metrics_port_setting_each_serve_their_own(
    mail_redis: Redis, mail_processes: ProcessPool
) -> None:
    """make run's MAIL_WORKERS processes share MAIL_METRICS_PORT: each takes the next
    free port and says which in its health key, where make status reads it."""
    port = free_port()
    for name in ("m1", "m2"):
        mail_processes.start(name, metrics_port=port)
    ports = {}
    for name in ("m1", "m2"):
        await wait_until_async(lambda n=name: mail_redis.exists(keys.mail_worker_alive(n)))
        alive = json.loads(await mail_redis.get(keys.mail_worker_alive(name)))
        ports[name] = alive["metrics_port"]
    assert len(set(ports.values())) == 2 and min(ports.values()) == port
    for metrics_port in ports.values():
        body = await asyncio.to_thread(
            lambda p=metrics_port: urllib.request.urlopen(
                f"http://127.0.0.1:{p}/metrics", timeout=10
            ).read()
        )
        assert b"phoneshop_mail_sent_total" in body


# -- the SMTP client and the batch Redis path (issue 16) ------------------------------------


@pytest.mark.parametrize("smtp_server", [True], ids=["pipelining"], indirect=True)
async def test_smtp_client_pipelines_the_envelope_and_dot_stuffs_the_content(
    smtp_server: SmtpServer,
) -> None:
    connection = await SmtpConnection.open(
        "127.0.0.1", smtp_server.port, timeout=5.0, ehlo_name="client.test"
    )
    assert connection.pipelining
    content = (
        b"Subject: dots\r\nMessage-ID: <dots@phoneshop.test>\r\n\r\n"
        b".one dot\r\n..two dots\r\n.\r\nlast line without its end"
    )
    await connection.send_mail("orders@phoneshop.test", ["a@example.test"], content)
    smtp_server.answer("451 4.3.0 Try again later")
    with pytest.raises(SmtpReplyError) as refused:
        await connection.send_mail("orders@phoneshop.test", ["b@example.test"], content)
    assert (refused.value.code, refused.value.command) == (451, "DATA")
    await connection.quit()

    first = smtp_server.received[0]
    # What the server took in is the content exactly (its end completed with CRLF):
    # every dot the client added for the transfer was taken off again.
    assert first.raw == content + b"\r\n"
    assert (first.mail_from, first.rcpt_tos) == ("orders@phoneshop.test", ("a@example.test",))
    assert smtp_server.handler.pipelined_envelopes == 2
    assert smtp_server.data_commands == 2


async def test_worker_sends_through_redis_py_when_the_multiplexed_connection_cannot(
    mail_redis: Redis,
    smtp_server: SmtpServer,
    mail_workers: WorkerPool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As for rediss:// or a cluster client: the chunk's commands go through redis-py.
    monkeypatch.setattr(MultiplexedRedis, "for_pool", classmethod(lambda cls, *args: None))
    orders = [await seed_order(mail_redis) for _ in range(5)]
    await mail_redis.set(keys.mail_sent(orders[0].order_id), '{"message_id": "x", "at": 1}')
    for order in orders:
        await add_event(mail_redis, "order.completed", order)
    worker = await mail_workers.start(concurrency=2)
    await wait_until_async(lambda: all_sent(mail_redis, orders))
    await wait_until_async(lambda: group_idle(mail_redis))

    assert sorted(smtp_server.message_ids()) == sorted(o.message_id for o in orders[1:])
    assert worker.stats["sent"] == 4 and worker.stats["duplicates"] == 1
    marker = json.loads(await mail_redis.get(keys.mail_sent(orders[1].order_id)))
    assert marker["message_id"] == orders[1].message_id
    for order in orders:
        assert not await mail_redis.exists(keys.mail_attempts(order.order_id))
