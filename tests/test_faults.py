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
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from app import keys
from app.ops.poll import wait_until_async
from app.partitions import PARTITIONS, partition_of
from loadtests.support.stack import FullStack, start_full_stack
from tests.helpers import all_events, orders_stored
from tests.mail_side import MailSide, mail_settled, message_id
from tests.order_storm import (
    CLIENT_TIMEOUT,
    STORM_ENV,
    Storm,
    call,
    check_books,
    order_storm,
    provision,
)


@dataclass
class Chaos:
    stack: FullStack
    mail: MailSide


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chaos]:
    directory = tmp_path_factory.mktemp("chaos")
    with start_full_stack(directory, instances=2, workers=1, env=STORM_ENV) as stack:
        mail = MailSide(redis_env=stack.redis_env, directory=directory)
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


async def placed_events(redis_url: str) -> set[str]:
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        entries = await all_events(redis)
        return {f["order_id"] for _, f in entries if f["type"] == "order.placed"}
    finally:
        await redis.aclose()


async def retry_queued(redis: Redis, order_ids: list[str]) -> bool:
    """The mail of one of ``order_ids`` waits in its partition's retry queue."""
    for order_id in order_ids:
        partition = partition_of(order_id)
        for entry_id in await redis.zrange(keys.mail_retry(partition), 0, -1):
            for _, fields in await redis.xrange(keys.events(partition), entry_id, entry_id):
                if fields.get("order_id") == order_id:
                    return True
    return False


# ---- the faults ----------------------------------------------------------------------


async def test_redis_kill_9_during_orders_loses_nothing_acknowledged(stack: FullStack) -> None:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        shoppers = await provision(session, stack, customers=12, stock=10**6)
        redis = Redis.from_url(stack.redis.url, decode_responses=True)
        orders_before = await orders_stored(redis)
        await redis.aclose()
        storm, until = Storm(), asyncio.Event()
        load = asyncio.create_task(order_storm(session, stack.http_url, shoppers, until, storm))
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
        shoppers = await provision(session, stack, customers=10, stock=10**6)
        storm, until = Storm(), asyncio.Event()
        load = asyncio.create_task(
            order_storm(session, stack.http_url, shoppers, until, storm, retry_with_key=True)
        )

        async def more_orders(what: str) -> None:
            acked = len(storm.acked)
            await wait_until_async(lambda: len(storm.acked) >= acked + 10, f"orders {what}")

        await more_orders("before the kill")
        await asyncio.to_thread(stack.kill_instance, 0)
        # Orders keep being acknowledged while instance 0 is down (through the other).
        await more_orders("while instance 0 is down")
        # Started from this thread: the child dies with the thread that forked
        # it (PR_SET_PDEATHSIG), and asyncio's executor threads end with the loop.
        stack.instances[0].start(wait=False)
        await asyncio.to_thread(stack.instances[0].wait_healthy)
        await more_orders("after the restart")
        until.set()
        await load
        await check_books(session, stack, storm)
        # At most one order per key: each customer's stored orders are exactly
        # the distinct orders its keys were answered with.
        stored = 0
        for headers in shoppers.tokens:
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
            shoppers = await provision(session, stack, customers=5, stock=10**6)
            phones, tokens = shoppers.phones, shoppers.tokens
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
            outage = len(completed)
            await place(20)
            # The outage is met: the surviving worker could not deliver a mail
            # of an order placed since, and queued it for a retry.
            await wait_until_async(
                lambda: retry_queued(redis, completed[outage:]), "a retry during the outage", 30
            )
            mail.start_sink()
            mail.start_worker("chaos-a")
            await place(10)

        await wait_until_async(
            lambda: mail_settled(redis, completed), "no mail pending", 90, interval=0.2
        )
        sent = [o for o in completed if await redis.exists(keys.mail_sent(o))]
        dead = sum([await redis.xlen(keys.mail_dead(p)) for p in range(PARTITIONS)])
    finally:
        await redis.aclose()
    ours = {message_id(o) for o in completed}
    arrived = Counter(mail.delivered_message_ids()) - delivered_before
    delivered = [m for m in arrived.elements() if m in ours]
    expected = {message_id(o) for o in sent}
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
        phones = (await provision(session, stack, customers=1, stock=10)).phones
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
