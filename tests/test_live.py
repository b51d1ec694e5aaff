"""Issue 6: live order events over a WebSocket (GET /orders/events) and the /live page.

In-process (the ``client`` fixture: the real app on a real redis-server) for the
protocol, and through the real stack (nginx + 2 gunicorn instances,
loadtests/support/stack.py) for nginx, the seed port, cross-instance delivery and SIGTERM.
Nothing is mocked; every wait is for a condition, with a generous deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import re
import shutil
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app import appkeys, keys
from app.events.sockets import CloseCode, EventsConfig
from app.events.stream import ZERO, StreamId, parse_last_id
from app.main import create_app
from app.ops.poll import wait_until_async
from app.partitions import PARTITIONS, partition_of
from app.vocabulary import PartitionEntryId
from loadtests.support.servers import RedisServer, free_port
from loadtests.support.stack import FullStack
from nginx.render import NginxConfig, render
from tests.helpers import ADMIN, CHROMIUM, CHROMIUM_ARGS, UPGRADE, Shop

DEADLINE = 30.0
PROBLEM = "application/problem+json"
ORDER_TYPES = {"order.placed", "order.completed", "order.cancelled"}


# ---- a client that collects what it is sent ------------------------------------------


class Listener:
    """A connected WebSocket whose messages a background task collects."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.done = asyncio.Event()
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        try:
            async for message in self.ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    self.messages.append(json.loads(message.data))
        finally:
            self.close_code = self.ws.close_code
            self.done.set()

    @property
    def events(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] in ORDER_TYPES]

    def last_id(self) -> str:
        return self.events[-1]["id"]

    async def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        try:
            await wait_until_async(condition, what, DEADLINE)
        except TimeoutError as error:
            raise AssertionError(f"{error}; got {self.messages[-5:]}") from None

    async def wait_live(self) -> dict[str, Any]:
        await self.wait_for(lambda: any(m["type"] == "live" for m in self.messages), "live")
        return next(m for m in self.messages if m["type"] == "live")

    async def wait_order(self, order_id: str, status: str) -> None:
        await self.wait_for(
            lambda: any(e["order_id"] == order_id and e["status"] == status for e in self.events),
            f"order {order_id} {status}",
        )

    async def wait_closed(self) -> int | None:
        await asyncio.wait_for(self.done.wait(), DEADLINE)
        return self.close_code

    async def close(self) -> None:
        await self.ws.close()
        await self.wait_closed()


async def listen(
    client: TestClient | aiohttp.ClientSession,
    url: str,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> Listener:
    listener = Listener(await client.ws_connect(url, headers=headers, **kwargs))
    await listener.wait_live()
    return listener


async def place(shop: Shop, auth: dict[str, str], phone_id: str, **extra: Any) -> str:
    response = await shop.order(auth, [(phone_id, 1)], **extra)
    assert response.status == 201, await response.text()
    return (await response.json())["order"]["id"]


async def stream_truth(redis: Redis, after: str, customer_id: str | None) -> list[str]:
    """Ids of the order events the streams hold after the resume point ``after``: one
    customer's (in its partition's stream), or everyone's, partition by partition."""
    resume = parse_last_id(after)
    assert resume is not None, after
    seen = [partition_of(customer_id)] if customer_id is not None else range(PARTITIONS)
    ids = []
    for partition in seen:
        start = resume if isinstance(resume, StreamId) else resume.get(partition, ZERO)
        entries = await redis.xrange(keys.events(partition), min=f"({start}", max="+")
        ids += [
            f"{partition}.{entry_id.decode()}"
            for entry_id, fields in entries
            if fields[b"type"].decode() in ORDER_TYPES
            and (customer_id is None or fields[b"customer_id"].decode() == customer_id)
        ]
    return ids


def assert_strictly_increasing(ids: list[str]) -> None:
    """Within each partition: events of different partitions have no order among them."""
    parsed = [PartitionEntryId.parse(i) for i in ids]
    assert None not in parsed, ids
    for partition in {p.partition for p in parsed if p is not None}:
        mine = [p.entry for p in parsed if p is not None and p.partition == partition]
        assert all(a < b for a, b in itertools.pairwise(mine)), ids


# ---- in-process: the protocol ----------------------------------------------------------


async def test_customer_sees_only_own_events_and_admin_sees_all(shop: Shop) -> None:
    phone = await shop.phone(stock=100)
    a, auth_a = await shop.customer()
    b, auth_b = await shop.customer()
    listen_a = await listen(shop.client, "/orders/events", auth_a)
    listen_b = await listen(shop.client, "/orders/events", auth_b)
    admin = await listen(shop.client, "/orders/events", ADMIN)

    order_a = await place(shop, auth_a, phone["id"])  # placed + completed (autocheck)
    order_b = await place(shop, auth_b, phone["id"], autocheck=False)
    cancel = await shop.client.post(f"/orders/{order_b}/cancel", headers=auth_b)
    assert cancel.status == 200
    await admin.wait_order(order_b, "cancelled")
    await listen_b.wait_order(order_b, "cancelled")
    # Delivery is in stream order: once A sees a later order of its own, any
    # event of B's placed before it would have reached A already.
    later_a = await place(shop, auth_a, phone["id"])
    await listen_a.wait_order(later_a, "completed")

    assert {e["customer_id"] for e in listen_a.events} == {a["id"]}
    assert {e["order_id"] for e in listen_a.events} == {order_a, later_a}
    assert {e["customer_id"] for e in listen_b.events} == {b["id"]}
    assert [(e["type"], e["status"]) for e in listen_b.events] == [
        ("order.placed", "open"),
        ("order.cancelled", "cancelled"),
    ]
    await admin.wait_order(later_a, "completed")
    # In order within each partition (a's and b's may differ: no order between them).
    assert [e["order_id"] for e in admin.events if e["customer_id"] == a["id"]] == [
        *(order_a, order_a),
        *(later_a, later_a),
    ]
    assert [e["order_id"] for e in admin.events if e["customer_id"] == b["id"]] == [
        order_b,
        order_b,
    ]
    assert {e["id"].split(".")[0] for e in listen_a.events} == {str(partition_of(a["id"]))}
    event = listen_a.events[0]
    assert set(event) == {"type", "id", "order_id", "customer_id", "status", "request_id", "at"}
    assert (event["type"], event["status"]) == ("order.placed", "open")
    assert isinstance(event["at"], int)
    for listener in (listen_a, listen_b, admin):
        assert_strictly_increasing([e["id"] for e in listener.events])
        await listener.close()


async def test_resume_has_no_gap_and_no_duplicate(shop: Shop, redis: Redis) -> None:
    """Disconnect, let orders happen, reconnect with last_id while orders keep
    being placed: the client gets exactly the stream's events after last_id."""
    # Stock and money for the thousands of orders the racing producer may place.
    phone = await shop.phone(stock=100_000, price_cents=100)
    customer, auth = await shop.customer()
    _, other_auth = await shop.customer()
    first = await listen(shop.client, "/orders/events", auth)
    for _ in range(3):
        await place(shop, auth, phone["id"])
    await first.wait_for(lambda: len(first.events) == 6, "3 orders, 2 events each")
    last_id = first.last_id()
    await first.close()

    missed = [await place(shop, auth, phone["id"], autocheck=False) for _ in range(3)]
    await shop.client.post(f"/orders/{missed[0]}/check", headers=auth)
    await place(shop, other_auth, phone["id"])  # someone else's: never sent

    async def keep_ordering(stop: asyncio.Event) -> None:
        while not stop.is_set():
            await place(shop, auth, phone["id"])
            await place(shop, other_auth, phone["id"])

    stop = asyncio.Event()
    producer = asyncio.create_task(keep_ordering(stop))  # races the replay/live handover
    try:
        await asyncio.sleep(0)  # one loop turn: the producer's first order is on its way
        second = await listen(shop.client, f"/orders/events?last_id={last_id}", auth)
        await second.wait_for(lambda: len(second.events) >= 10, "a few live events")
    finally:
        stop.set()
        await producer
    sentinel = await place(shop, auth, phone["id"])
    await second.wait_order(sentinel, "completed")

    received = [e["id"] for e in second.events]
    assert received == await stream_truth(redis, last_id, customer["id"])
    assert len(received) == len(set(received))
    assert second.messages[0]["type"] != "resync"
    live = next(m for m in second.messages if m["type"] == "live")
    assert live["replayed"] >= 4  # at least the 3 missed orders and the check
    await second.close()


async def test_the_hub_reads_nothing_while_no_socket_listens_and_resumes_without_gap(
    shop: Shop, redis: Redis
) -> None:
    """Issue 12: the hub used to XREAD and parse every event with no socket
    connected. Now it idles; a socket joining wakes it, and a resume across the
    idle time has no gap and no duplicate, even with orders racing the join."""
    hub = shop.client.app[appkeys.EVENT_HUB]
    # Short blocks: the reader notices sooner that the last socket left.
    hub.config = dataclasses.replace(hub.config, read_block_ms=200)
    # The racing producer below places an order a millisecond in-process until the
    # resumed socket has 10 events (polled every 50 ms): stock and money for thousands.
    phone = await shop.phone(stock=100_000, price_cents=100)
    customer, auth = await shop.customer()
    _, other_auth = await shop.customer()

    async def xreads() -> int:
        stats = await redis.info("commandstats")
        return int(stats.get("cmdstat_xread", {}).get("calls", 0))

    async def blocked_in_xread() -> bool:
        # cmd is the connection's last command; flag b: blocked in it right now.
        clients = await redis.client_list()
        return any(c["cmd"] == "xread" and "b" in c["flags"] for c in clients)

    # Never a socket since the worker started: not one read.
    start = await xreads()
    for _ in range(3):
        await place(shop, auth, phone["id"])
    assert await xreads() == start
    assert hub.positions == {} and not await blocked_in_xread()

    first = await listen(shop.client, "/orders/events", auth)
    seen = await place(shop, auth, phone["id"])
    await first.wait_order(seen, "completed")
    last_id = first.last_id()
    await first.close()
    await first.wait_for(lambda: not hub.ready.is_set(), "the reader idles once nobody listens")

    # Idle: orders come in, the reader reads none of them.
    idle_from = await xreads()
    missed = [await place(shop, auth, phone["id"]) for _ in range(3)]
    await place(shop, other_auth, phone["id"])
    assert await xreads() == idle_from
    assert not await blocked_in_xread()

    async def keep_ordering(stop: asyncio.Event) -> None:
        while not stop.is_set():
            await place(shop, auth, phone["id"])

    stop = asyncio.Event()
    producer = asyncio.create_task(keep_ordering(stop))  # races the wake-up and the replay
    try:
        await asyncio.sleep(0)  # one loop turn: the producer's first order is on its way
        resumed = await listen(shop.client, f"/orders/events?last_id={last_id}", auth)
        fresh = await listen(shop.client, "/orders/events", auth)
        await resumed.wait_for(lambda: len(resumed.events) >= 10, "replayed and live events")
    finally:
        stop.set()
        await producer
    fresh_from = fresh.messages[0]["last_id"]
    sentinel = await place(shop, auth, phone["id"])
    await resumed.wait_order(sentinel, "completed")
    await fresh.wait_order(sentinel, "completed")

    received = [e["id"] for e in resumed.events]
    assert received == await stream_truth(redis, last_id, customer["id"])  # no gap, no duplicate
    assert {e["order_id"] for e in resumed.events} >= set(missed)
    assert [e["id"] for e in fresh.events] == await stream_truth(redis, fresh_from, customer["id"])
    assert not set(missed) & {e["order_id"] for e in fresh.events}  # fresh starts live
    await resumed.close()
    await fresh.close()


async def test_no_last_id_starts_live_and_last_id_zero_replays_everything(
    shop: Shop, redis: Redis
) -> None:
    phone = await shop.phone()
    customer, auth = await shop.customer()
    before = await place(shop, auth, phone["id"])
    fresh = await listen(shop.client, "/orders/events", auth)
    replay = await listen(shop.client, "/orders/events?last_id=0-0", auth)
    after = await place(shop, auth, phone["id"])
    await fresh.wait_order(after, "completed")
    await replay.wait_order(after, "completed")
    assert {e["order_id"] for e in fresh.events} == {after}
    assert [e["order_id"] for e in replay.events] == [before, before, after, after]
    # Nothing was ever removed from the stream: no resync for a full replay.
    assert all(m["type"] != "resync" for m in replay.messages)
    assert [e["id"] for e in replay.events] == await stream_truth(redis, "0-0", customer["id"])
    await fresh.close()
    await replay.close()


async def test_resync_when_last_id_is_older_than_the_trimmed_stream(
    shop: Shop, redis: Redis
) -> None:
    phone = await shop.phone()
    customer, auth = await shop.customer()
    stream = keys.events(partition_of(customer["id"]))
    first = await listen(shop.client, "/orders/events", auth)
    old = await place(shop, auth, phone["id"])
    await first.wait_order(old, "completed")
    stale_id = first.events[0]["id"]  # the client saw only order.placed
    await first.close()
    kept = await place(shop, auth, phone["id"])
    # Trim everything up to and including `old`'s completed event: an entry
    # after stale_id is gone.
    newest_kept = (await redis.xrange(stream, min="-", max="+"))[-2][0]
    assert await redis.xtrim(stream, minid=newest_kept, approximate=False) > 0

    resumed = await listen(shop.client, f"/orders/events?last_id={stale_id}", auth)
    resync = resumed.messages[0]
    assert resync["type"] == "resync"
    assert resync["reason"] == "trimmed"
    assert resync["last_id"] == stale_id
    assert resync["first_id"] == f"{partition_of(customer['id'])}.{newest_kept.decode()}"
    assert "GET /orders" in resync["detail"]
    # Then what the stream still holds, then live.
    assert [e["order_id"] for e in resumed.events] == [kept, kept]
    live_order = await place(shop, auth, phone["id"])
    await resumed.wait_order(live_order, "completed")
    await resumed.close()


async def test_resync_when_last_id_is_not_from_this_stream(shop: Shop) -> None:
    phone = await shop.phone()
    _, auth = await shop.customer()
    future = await listen(shop.client, "/orders/events?last_id=99999999999999-0", auth)
    assert future.messages[0]["type"] == "resync"
    assert future.messages[0]["reason"] == "unknown_id"
    order = await place(shop, auth, phone["id"])
    await future.wait_order(order, "completed")  # not filtered out as "older than last_id"
    await future.close()


async def test_the_reader_rides_out_a_redis_restart(shop: Shop, redis_server: RedisServer) -> None:
    phone = await shop.phone()
    _, auth = await shop.customer()
    listener = await listen(shop.client, "/orders/events", auth)
    before = await place(shop, auth, phone["id"])
    await listener.wait_order(before, "completed")
    redis_server.stop()
    redis_server.start()  # same port, data back from the AOF
    after = await place(shop, auth, phone["id"])
    await listener.wait_order(after, "completed")
    assert [e["order_id"] for e in listener.events] == [before, before, after, after]
    assert all(m["type"] != "resync" for m in listener.messages)
    await listener.close()


async def test_resync_when_entries_were_trimmed_while_the_reader_was_cut_off(
    shop: Shop, redis: Redis
) -> None:
    """The reader's connection drops and cannot come back (Redis now wants a
    password) while events are appended and trimmed: once it is back, every
    socket is told, then gets what is left. Never a silent gap."""
    phone = await shop.phone()
    customer, auth = await shop.customer()
    listener = await listen(shop.client, "/orders/events", auth)
    seen = await place(shop, auth, phone["id"])
    await listener.wait_order(seen, "completed")

    async def reader_client_id() -> str | None:
        for client in await redis.client_list():
            if client["cmd"] == "xread":
                return client["id"]
        return None

    reader_id = await wait_until_async(reader_client_id, "a blocked XREAD", DEADLINE)
    await redis.config_set("requirepass", "live-test-password")
    try:
        await redis.client_kill_filter(_id=reader_id)
        lost = {**FLOOD_EVENT, "customer_id": customer["id"], "order_id": "L" * 22}
        kept = {**FLOOD_EVENT, "customer_id": customer["id"], "order_id": "K" * 22}
        stream = keys.events(partition_of(customer["id"]))
        await redis.xadd(stream, lost)
        kept_id = await redis.xadd(stream, kept)
        await redis.xtrim(stream, minid=kept_id, approximate=False)
    finally:
        await redis.config_set("requirepass", "")

    await listener.wait_for(lambda: any(e["order_id"] == "K" * 22 for e in listener.events), "K")
    resync = next(m for m in listener.messages if m["type"] == "resync")
    assert resync["reason"] == "trimmed"
    assert listener.messages.index(resync) < next(
        i for i, m in enumerate(listener.messages) if m.get("order_id") == "K" * 22
    )
    assert all(e["order_id"] != "L" * 22 for e in listener.events)
    after = await place(shop, auth, phone["id"])
    await listener.wait_order(after, "completed")
    await listener.close()


async def test_slow_consumer_is_closed_while_another_client_keeps_receiving(
    shop: Shop, redis: Redis
) -> None:
    """A client that reads nothing falls behind until its queue passes the bound
    and is closed with 4008; an admin reading along gets every event meanwhile."""
    app = shop.client.app
    hub = app[appkeys.EVENT_HUB]
    healthy = await listen(shop.client, "/orders/events", ADMIN)
    slow = await RawWebSocket.connect(shop.client.host, shop.client.port, ADMIN)
    await wait_until_async(lambda: hub.subscribers == 2, "both sockets subscribed", DEADLINE)

    produced = 0
    batch = 1000
    while hub.subscribers == 2:
        assert produced < 400_000, "the slow client was never closed"
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(batch):
                pipe.xadd(keys.events(0), FLOOD_EVENT)
            await pipe.execute()
        produced += batch
        # The healthy client keeps up: wait for it before producing more.
        await healthy.wait_for(
            lambda expected=produced: len(healthy.events) == expected, f"{produced} events"
        )

    frames = await slow.read_to_end()
    assert frames[-1][0] == 0x8, "the last frame is a close frame"
    code = struct.unpack("!H", frames[-1][1][:2])[0]
    assert code == CloseCode.SLOW_CONSUMER == 4008
    assert b"slow consumer" in frames[-1][1]
    delivered = [json.loads(p) for op, p in frames if op == 0x1]
    assert len(delivered) < produced  # it really fell behind

    phone = await shop.phone()
    _, auth = await shop.customer()
    order = await place(shop, auth, phone["id"])
    await healthy.wait_order(order, "completed")
    assert len(healthy.events) == produced + 2
    assert_strictly_increasing([e["id"] for e in healthy.events])
    await healthy.close()


async def test_a_resume_from_far_back_reads_a_bounded_part_of_the_stream(
    shop: Shop, redis: Redis
) -> None:
    """?last_id=0-1 on a long stream used to page through all of it, discarding
    other customers' events. One replay now reads replay_max_entries at most,
    says so with a resync, then goes live without a gap."""
    hub = shop.client.app[appkeys.EVENT_HUB]
    hub.config = dataclasses.replace(hub.config, replay_page=100, replay_max_entries=1000)
    phone = await shop.phone()
    customer, auth = await shop.customer()
    partition = partition_of(customer["id"])
    stream = keys.events(partition)
    early = await place(shop, auth, phone["id"])  # the 2 first entries of the stream
    async with redis.pipeline(transaction=False) as pipe:
        for _ in range(5000):
            pipe.xadd(stream, FLOOD_EVENT)  # someone else's, in the customer's partition
        await pipe.execute()

    async def xrange_calls() -> int:
        stats = await redis.info("commandstats")
        return int(stats.get("cmdstat_xrange", {}).get("calls", 0))

    before = await xrange_calls()
    resumed = await listen(shop.client, "/orders/events?last_id=0-1", auth)
    pages = await xrange_calls() - before
    assert pages == 1000 // 100  # was 51: every page of the 5,002 entries
    kinds = [m["type"] for m in resumed.messages]
    assert kinds == ["order.placed", "order.completed", "resync", "live"], kinds
    assert {e["order_id"] for e in resumed.events} == {early}
    resync = resumed.messages[2]
    assert resync["reason"] == "replay_limit"
    thousandth = (await redis.xrange(stream, min="-", max="+", count=1000))[-1][0]
    assert resync["last_id"] == f"{partition}.{thousandth.decode()}"  # where it stopped reading
    assert "GET /orders" in resync["detail"]
    live = resumed.messages[3]
    assert live["replayed"] == 2
    end = (await redis.xinfo_stream(stream))["last-generated-id"].decode()
    assert live["last_id"] == f"{partition}.{end}"

    later = await place(shop, auth, phone["id"])
    await resumed.wait_order(later, "completed")
    assert [e["id"] for e in resumed.events[2:]] == await stream_truth(
        redis, live["last_id"], customer["id"]
    )
    await resumed.close()


FLOOD_EVENT = {
    "type": "order.placed",
    "order_id": "F" * 22,
    "customer_id": "C" * 22,
    "status": "open",
    "request_id": "flood",
    "at": "1700000000000",
}


async def test_unauthenticated_upgrade_is_refused_with_401(client: TestClient) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer not-a-token"},
        {"Sec-WebSocket-Protocol": "bearer, not-a-token"},
        {"Sec-WebSocket-Protocol": "bearer"},
        {"Sec-WebSocket-Protocol": "chat, superchat"},
    ):
        response = await client.get("/orders/events", headers={**UPGRADE, **headers})
        assert response.status == 401, headers
        assert response.content_type == PROBLEM
        assert (await response.json(content_type=PROBLEM))["code"] == "unauthorized"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/orders/events")
    assert refused.value.status == 401


async def test_bad_last_id_and_plain_get_are_refused_before_upgrading(client: TestClient) -> None:
    for last_id in (
        *("abc", "1-2-3", "-1-0", "1", "99999999999999999999999-0", "1-0;x"),
        # per partition: no partition 128, each partition once, nothing empty
        *("128.1-0", "1.1-0,1.2-0", "1.", ".1-0", "1.1-0,", "0001.1-0"),
    ):
        response = await client.get(
            "/orders/events", params={"last_id": last_id}, headers={**UPGRADE, **ADMIN}
        )
        assert response.status == 422, last_id
        assert (await response.json(content_type=PROBLEM))["code"] == "validation_error"
    plain = await client.get("/orders/events", headers=ADMIN)
    assert plain.status == 426
    assert plain.content_type == PROBLEM


async def test_upgrade_refused_with_503_past_the_socket_cap(shop: Shop) -> None:
    hub = shop.client.app[appkeys.EVENT_HUB]
    hub.config = dataclasses.replace(hub.config, max_sockets=1)
    first = await listen(shop.client, "/orders/events", ADMIN)
    refused = await shop.client.get("/orders/events", headers={**UPGRADE, **ADMIN})
    assert refused.status == 503
    assert refused.headers["Retry-After"]
    assert (await refused.json(content_type=PROBLEM))["code"] == "overloaded"
    await first.close()
    await wait_until_async(
        lambda: not shop.client.app[appkeys.EVENT_SOCKETS], "the first one gone", DEADLINE
    )
    second = await listen(shop.client, "/orders/events", ADMIN)
    await second.close()


async def test_upgrade_refused_with_503_while_redis_is_unreachable(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("ADMIN_TOKEN", ADMIN["Authorization"].removeprefix("Bearer "))
    monkeypatch.setenv("REDIS_TIMEOUT", "0.3")
    client: TestClient = await aiohttp_client(await create_app())
    response = await client.get("/orders/events", headers={**UPGRADE, **ADMIN})
    assert response.status == 503
    assert (await response.json(content_type=PROBLEM))["code"] == "service_unavailable"


async def test_browser_style_subprotocol_token(shop: Shop) -> None:
    phone = await shop.phone()
    customer, auth = await shop.customer()
    token = auth["Authorization"].removeprefix("Bearer ")
    listener = await listen(shop.client, "/orders/events", protocols=("bearer", token))
    assert listener.ws.protocol == "bearer"
    order = await place(shop, auth, phone["id"])
    await listener.wait_order(order, "completed")
    assert {e["customer_id"] for e in listener.events} == {customer["id"]}
    await listener.close()


async def test_every_socket_is_closed_with_going_away_on_shutdown(shop: Shop) -> None:
    _, auth = await shop.customer()
    listeners = [
        await listen(shop.client, "/orders/events", auth),
        await listen(shop.client, "/orders/events", ADMIN),
    ]
    await shop.client.server.close()  # the app's shutdown: on_shutdown, then cleanup
    for listener in listeners:
        assert await listener.wait_closed() == CloseCode.GOING_AWAY == 1001


async def test_open_sockets_do_not_use_up_the_in_flight_cap(
    aiohttp_client: Any, app_env: dict[str, str], redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAX_INFLIGHT", "2")
    client: TestClient = await aiohttp_client(await create_app())
    listeners = [await listen(client, "/orders/events", ADMIN) for _ in range(4)]
    for _ in range(3):
        assert (await client.get("/phones")).status == 200
    for listener in listeners:
        await listener.close()
    assert client.app[appkeys.INFLIGHT].current == 0


async def test_idle_sockets_are_pinged_and_silent_ones_dropped(shop: Shop) -> None:
    """Heartbeat: the server pings every `heartbeat` seconds (keeping nginx and
    other proxies from timing the socket out); a client that never answers is
    dropped and forgotten."""
    app = shop.client.app
    hub = app[appkeys.EVENT_HUB]
    hub.config = dataclasses.replace(hub.config, heartbeat=0.3)
    ws = await shop.client.ws_connect("/orders/events", headers=ADMIN, autoping=False)
    kinds = []
    async for message in ws:  # answers nothing: no pong
        kinds.append(message.type)
    assert aiohttp.WSMsgType.PING in kinds
    await wait_until_async(
        lambda: not app[appkeys.EVENT_SOCKETS], "the silent socket forgotten", DEADLINE
    )
    assert hub.subscribers == 0


def test_nginx_keeps_event_sockets_open_longer_than_the_heartbeat() -> None:
    """Every listener proxying /orders/events passes the upgrade through and
    waits longer for the app than the app's ping interval."""
    rendered = render(NginxConfig())
    locations = re.findall(r"location = /orders/events \{(.*?)\}", rendered, re.DOTALL)
    assert len(locations) == 2  # HTTP_PORT and the seed orders port
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "": 1}
    for block in locations:
        assert "proxy_set_header" not in block  # would drop the inherited Upgrade headers
        value, unit = re.search(r"proxy_read_timeout (\d+)(ms|s|m|h|)?;", block).groups()
        assert int(value) * units[unit or ""] > 2 * EventsConfig().heartbeat
    assert "proxy_set_header Upgrade $http_upgrade;" in rendered
    assert "proxy_set_header Connection $connection_upgrade;" in rendered


async def test_live_page_is_served_with_a_strict_policy(client: TestClient) -> None:
    response = await client.get("/live")
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    assert "/orders/events" in page
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'sha256-" in policy
    assert "connect-src 'self'" in policy
    spec = await (await client.get("/openapi.json")).json()
    assert "/orders/events" not in spec["paths"]  # a WebSocket: described in the README


# ---- a raw client that reads nothing until told to ---------------------------------------


class RawWebSocket:
    """A WebSocket client on a bare socket with a small receive buffer that reads
    nothing after the handshake: the slowest consumer there is."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int, headers: dict[str, str]) -> RawWebSocket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        request = f"GET /orders/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
        for name, value in {**UPGRADE, **headers}.items():
            request += f"{name}: {value}\r\n"
        writer.write(request.encode() + b"\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def read_to_end(self) -> list[tuple[int, bytes]]:
        """Every frame the server sent, up to the connection's end: (opcode, payload)."""
        data = await asyncio.wait_for(self.reader.read(), DEADLINE)
        self.writer.close()
        await self.writer.wait_closed()
        frames = []
        while data:
            opcode, length, offset = data[0] & 0x0F, data[1] & 0x7F, 2
            if length == 126:
                length, offset = struct.unpack("!H", data[2:4])[0], 4
            elif length == 127:
                length, offset = struct.unpack("!Q", data[2:10])[0], 10
            assert len(data) >= offset + length, "the connection ended inside a frame"
            frames.append((opcode, data[offset : offset + length]))
            data = data[offset + length :]
        return frames


# ---- through the real stack: nginx, the seed port, 2 instances --------------------------


@pytest.fixture
async def http(full_stack: FullStack) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def stack_shop(
    http: aiohttp.ClientSession, stack: FullStack, customers: int = 1
) -> tuple[str, list[tuple[str, dict[str, str]]]]:
    base = stack.direct_url  # set-up bypasses nginx's write limits
    response = await http.post(
        f"{base}/phones",
        json={"name": "Live phone", "price_cents": 100, "stock": 10_000},
        headers=stack.admin_headers,
    )
    assert response.status == 201, await response.text()
    phone_id = (await response.json())["phone"]["id"]
    made = []
    for _ in range(customers):
        response = await http.post(
            f"{base}/customers",
            json={
                "name": "Live",
                "surname": "Client",
                "email": f"live-{os.urandom(8).hex()}@example.com",
                "balance_cents": 10_000_000,
            },
            headers=stack.admin_headers,
        )
        assert response.status == 201, await response.text()
        body = await response.json()
        made.append((body["customer"]["id"], {"Authorization": f"Bearer {body['token']}"}))
    return phone_id, made


async def stack_order(
    http: aiohttp.ClientSession, base: str, auth: dict[str, str], phone_id: str, **extra: Any
) -> str:
    response = await http.post(
        f"{base}/orders",
        json={"items": [{"phone_id": phone_id, "quantity": 1}], **extra},
        headers=auth,
    )
    assert response.status == 201, await response.text()
    return (await response.json())["order"]["id"]


def ws_url(base: str, last_id: str | None = None) -> str:
    url = base.replace("http://", "ws://") + "/orders/events"
    return url if last_id is None else f"{url}?last_id={last_id}"


async def test_stack_events_reach_every_instance_through_nginx_and_the_seed_port(
    full_stack: FullStack, http: aiohttp.ClientSession
) -> None:
    phone_id, [(a_id, auth_a), (b_id, auth_b)] = await stack_shop(http, full_stack, customers=2)
    one, two = full_stack.instances[0].url, full_stack.instances[1].url
    listeners = {
        "nginx": await listen(http, ws_url(full_stack.http_url), auth_a),
        "seed orders port": await listen(http, ws_url(full_stack.seed_orders_url), auth_a),
        "instance 2": await listen(http, ws_url(two), auth_a),
        "B via nginx": await listen(http, ws_url(full_stack.http_url), auth_b),
    }
    # Placed through instance 1 directly, and through nginx (either instance).
    via_one = await stack_order(http, one, auth_a, phone_id, autocheck=False)
    via_nginx = await stack_order(http, full_stack.http_url, auth_a, phone_id)
    checked = await http.post(f"{full_stack.http_url}/orders/{via_one}/check", headers=auth_a)
    assert checked.status == 200
    b_order = await stack_order(http, two, auth_b, phone_id)
    for name, listener in listeners.items():
        if name.startswith("B"):
            await listener.wait_order(b_order, "completed")
            assert {e["customer_id"] for e in listener.events} == {b_id}
            continue
        await listener.wait_order(via_one, "completed")
        await listener.wait_order(via_nginx, "completed")
        assert {e["customer_id"] for e in listener.events} == {a_id}, name
        assert len(listener.events) == 4, name
    for listener in listeners.values():
        await listener.close()


async def test_stack_resume_across_instances_without_gap_or_duplicate(
    full_stack: FullStack, http: aiohttp.ClientSession
) -> None:
    phone_id, [(customer_id, auth)] = await stack_shop(http, full_stack)
    one, two = full_stack.instances[0].url, full_stack.instances[1].url
    first = await listen(http, ws_url(one), auth)
    seen = await stack_order(http, one, auth, phone_id)
    await first.wait_order(seen, "completed")
    last_id = first.last_id()
    await first.close()
    missed = [await stack_order(http, two, auth, phone_id) for _ in range(3)]
    resumed = await listen(http, ws_url(full_stack.http_url, last_id), auth)
    live = await stack_order(http, one, auth, phone_id)
    await resumed.wait_order(live, "completed")
    assert [e["order_id"] for e in resumed.events] == [
        order for order in [*missed, live] for _ in ("placed", "completed")
    ]
    redis = Redis.from_url(full_stack.redis.url)
    try:
        assert [e["id"] for e in resumed.events] == await stream_truth(redis, last_id, customer_id)
    finally:
        await redis.aclose()
    await resumed.close()


async def test_stack_unauthenticated_upgrade_is_refused_with_401_through_nginx(
    full_stack: FullStack, http: aiohttp.ClientSession
) -> None:
    for base in (full_stack.http_url, full_stack.seed_orders_url):
        response = await http.get(f"{base}/orders/events", headers=UPGRADE)
        assert response.status == 401
        assert response.content_type == PROBLEM
        assert (await response.json(content_type=PROBLEM))["code"] == "unauthorized"


async def test_stack_sigterm_closes_sockets_with_going_away(
    full_stack: FullStack, http: aiohttp.ClientSession
) -> None:
    """gunicorn's graceful stop runs the app's shutdown in every worker: the
    socket gets 1001 and, reconnecting through nginx with its last id, misses
    nothing placed meanwhile."""
    phone_id, [(_, auth)] = await stack_shop(http, full_stack)
    first = await listen(http, ws_url(full_stack.instances[0].url), auth)
    seen = await stack_order(http, full_stack.instances[1].url, auth, phone_id)
    await first.wait_order(seen, "completed")
    await asyncio.to_thread(full_stack.terminate_instance, 0)
    assert await first.wait_closed() == CloseCode.GOING_AWAY
    missed = await stack_order(http, full_stack.instances[1].url, auth, phone_id)
    resumed = await listen(http, ws_url(full_stack.http_url, first.last_id()), auth)
    await resumed.wait_order(missed, "completed")
    assert [e["order_id"] for e in resumed.events] == [missed, missed]
    await resumed.close()


# ---- the /live page in headless Chromium ---------------------------------------------------


@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="chromium: run `make setup`")
async def test_live_page_shows_an_order_open_then_completed(
    full_stack: FullStack, http: aiohttp.ClientSession
) -> None:
    from playwright.async_api import async_playwright, expect

    phone_id, [(_, auth)] = await stack_shop(http, full_stack)
    token = auth["Authorization"].removeprefix("Bearer ")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on(
                "console",
                lambda message: errors.append(message.text) if message.type == "error" else None,
            )
            await page.goto(f"{full_stack.http_url}/live")
            await page.fill("#token", token)
            await page.click("#connect")
            await expect(page.locator("#state")).to_have_text("live", timeout=DEADLINE * 1000)

            order = await stack_order(http, full_stack.http_url, auth, phone_id, autocheck=False)
            status = page.locator(f'tr[data-order-id="{order}"] td.status')
            await expect(status).to_have_text("open", timeout=DEADLINE * 1000)
            checked = await http.post(f"{full_stack.http_url}/orders/{order}/check", headers=auth)
            assert checked.status == 200
            await expect(status).to_have_text("completed", timeout=DEADLINE * 1000)
            log = await page.locator("#log").inner_text()
            assert f"order.placed {order} -> open" in log
            assert f"order.completed {order} -> completed" in log
            assert errors == []  # the CSP let the page's own script run, and nothing failed
        finally:
            await browser.close()


@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="chromium: run `make setup`")
async def test_live_page_loads_recent_orders_with_items_totals_and_keeps_the_token_for_the_tab(
    full_stack: FullStack, http: aiohttp.ClientSession
) -> None:
    """Issue 18 item 5: orders placed before the page connected appear on
    connect with their items and totals; later ones too; a reload reconnects
    with the token kept in sessionStorage; another tab does not have it."""
    from playwright.async_api import async_playwright, expect

    phone_id, [(_, auth)] = await stack_shop(http, full_stack)  # "Live phone", 1.00
    token = auth["Authorization"].removeprefix("Bearer ")
    base = full_stack.http_url

    async def order(quantity: int, autocheck: bool) -> str:
        response = await http.post(
            f"{base}/orders",
            json={"items": [{"phone_id": phone_id, "quantity": quantity}], "autocheck": autocheck},
            headers=auth,
        )
        assert response.status == 201, await response.text()
        return (await response.json())["order"]["id"]

    earlier_completed = await order(2, autocheck=True)
    earlier_open = await order(3, autocheck=False)
    wait = {"timeout": DEADLINE * 1000}

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context()
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on(
                "console",
                lambda message: errors.append(message.text) if message.type == "error" else None,
            )
            await page.goto(f"{base}/live")
            await page.fill("#token", token)
            await page.click("#connect")
            await expect(page.locator("#state")).to_have_text("live", **wait)

            def row(order_id: str, cell: str) -> Any:
                return page.locator(f'tr[data-order-id="{order_id}"] td.{cell}')

            async def expect_row(order_id: str, status: str, items: str, total: str) -> None:
                await expect(row(order_id, "status")).to_have_text(status, **wait)
                await expect(row(order_id, "items")).to_have_text(items, **wait)
                await expect(row(order_id, "total")).to_have_text(total, **wait)

            # On connect, before anything changed: the recent orders, newest first.
            await expect_row(earlier_completed, "completed", "2 x Live phone @ 1.00", "2.00")
            await expect_row(earlier_open, "open", "3 x Live phone @ 1.00", "3.00")
            ids = await page.locator("#orders tr").evaluate_all(
                "rows => rows.map(r => r.dataset.orderId)"
            )
            assert ids == [earlier_open, earlier_completed]

            # Live: a check of an earlier order, then a new order with its items.
            checked = await http.post(f"{base}/orders/{earlier_open}/check", headers=auth)
            assert checked.status == 200
            await expect(row(earlier_open, "status")).to_have_text("completed", **wait)
            later = await order(1, autocheck=False)
            await expect_row(later, "open", "1 x Live phone @ 1.00", "1.00")

            # A reload keeps the token for this tab and reconnects by itself.
            assert await page.evaluate("Object.values(sessionStorage)") == [token]
            await page.reload()
            await expect(page.locator("#state")).to_have_text("live", **wait)
            assert await page.input_value("#token") == token
            await expect_row(later, "open", "1 x Live phone @ 1.00", "1.00")
            await expect_row(earlier_open, "completed", "3 x Live phone @ 1.00", "3.00")
            await expect(page.locator("#orders tr")).to_have_count(3)

            # Another tab starts without it.
            other = await context.new_page()
            await other.goto(f"{base}/live")
            assert await other.input_value("#token") == ""
            await expect(other.locator("#state")).to_have_text("disconnected")

            # Forgetting it clears this tab too.
            await page.click("#forget")
            assert await page.evaluate("sessionStorage.length") == 0
            await page.reload()
            await expect(page.locator("#state")).to_have_text("disconnected")
            await expect(page.locator("#orders tr")).to_have_count(0)
            assert errors == []
        finally:
            await browser.close()


@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="chromium: run `make setup`")
async def test_live_page_drops_a_refused_token_from_the_tab(
    full_stack: FullStack, http: aiohttp.ClientSession
) -> None:
    from playwright.async_api import async_playwright, expect

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(f"{full_stack.http_url}/live")
            await page.fill("#token", "not-a-token")
            await page.click("#connect")
            await expect(page.locator("#state")).to_have_text(
                "could not connect: check the token", timeout=DEADLINE * 1000
            )
            assert await page.evaluate("sessionStorage.length") == 0
        finally:
            await browser.close()
