"""Orders through the app on a real Redis Cluster, end to end: the split saga places them
(the customer and the phone on different primaries), each order
script appends to its partition's stream ``e{P}`` (no CROSSSLOT), the mail worker
mails each completed order once (its consumer group on every stream, the doorbell and
the sweep), and the customer's and the admin's WebSockets see the events (the hub's
per-partition reads on a cluster)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app import appkeys, keys, partitions
from app.main import create_app
from app.ops.poll import wait_until_async
from app.ops.redis_cluster import LocalCluster
from mail.settings import MailSettings
from mail.worker import MailWorker, connect_redis
from tests.helpers import ADMIN, ADMIN_TOKEN, Shop
from tests.mail_fixtures import SmtpServer

DEADLINE = 30.0


@pytest.fixture
async def saga_cluster_shop(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch, redis_cluster: LocalCluster
) -> Shop:
    nodes = ",".join(f"127.0.0.1:{port}" for port in redis_cluster.ports[:3])
    for name, value in {
        "REDIS_URL": "redis://127.0.0.1/0",
        "REDIS_CLUSTER_NODES": nodes,
        "ADMIN_TOKEN": ADMIN_TOKEN,
    }.items():
        monkeypatch.setenv(name, value)
    client: TestClient = await aiohttp_client(await create_app())
    return Shop(client)


@pytest.fixture
async def cluster_mail_worker(
    redis_cluster: LocalCluster, mail_settings: MailSettings
) -> AsyncIterator[MailWorker]:
    settings = replace(
        mail_settings,
        redis_cluster_nodes=tuple(("127.0.0.1", port) for port in redis_cluster.ports[:3]),
        worker_name="cluster-test-worker",
    )
    redis = connect_redis(settings)
    worker = MailWorker(settings, redis)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, DEADLINE)
        await redis.aclose()


class Listener:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for message in self.ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                self.messages.append(json.loads(message.data))

    def events_of(self, order_id: str) -> list[tuple[str, str]]:
        return [(m["type"], m["id"]) for m in self.messages if m.get("order_id") == order_id]

    async def close(self) -> None:
        await self.ws.close()
        await self._task


async def listen(client: TestClient, headers: dict[str, str]) -> Listener:
    listener = Listener(await client.ws_connect("/orders/events", headers=headers))
    await wait_until_async(
        lambda: any(m["type"] == "live" for m in listener.messages), "live", DEADLINE
    )
    return listener


async def test_an_order_across_primaries_is_placed_checked_mailed_once_and_seen_live(
    redis_cluster: LocalCluster,
    saga_cluster_shop: Shop,
    smtp_server: SmtpServer,
    cluster_mail_worker: MailWorker,
) -> None:
    shop, client = saga_cluster_shop, saga_cluster_shop.client
    view = redis_cluster.topology()

    def primary(entity_id: str) -> int:
        slot = partitions.slot(partitions.partition_of(entity_id))
        return view.primary_for_slot(slot).port

    customer, auth = await shop.customer(balance_cents=100_000)
    phone = await shop.phone(price_cents=10_000, stock=5)
    while primary(phone["id"]) == primary(customer["id"]):
        phone = await shop.phone(price_cents=10_000, stock=5)
    mine = await listen(client, auth)
    admin = await listen(client, ADMIN)

    placed = await shop.order(auth, [(phone["id"], 2)], autocheck=False)
    assert placed.status == 201, await placed.text()
    order_id = (await placed.json())["order"]["id"]
    assert partitions.partition_of(order_id) == partitions.partition_of(customer["id"])
    checked = await client.post(f"/orders/{order_id}/check", headers=auth)
    assert checked.status == 200, await checked.text()
    assert (await checked.json())["order"]["status"] == "completed"

    # Mailed once, with the stable Message-ID, and marked in the order's partition.
    message_id = f"<order-{order_id}@{cluster_mail_worker.settings.mail_domain}>"
    await wait_until_async(lambda: message_id in smtp_server.message_ids(), "the mail", DEADLINE)
    marker = await wait_until_async(
        lambda: shop_redis_get(client, keys.mail_sent(order_id)), "the sent marker", DEADLINE
    )
    assert json.loads(marker)["message_id"] == message_id
    # Both events, on both sockets, with ids of the order's partition.
    partition = partitions.partition_of(order_id)
    for listener in (mine, admin):
        await wait_until_async(
            lambda listener=listener: len(listener.events_of(order_id)) == 2,
            "the order's two events",
            DEADLINE,
        )
        events = listener.events_of(order_id)
        assert [kind for kind, _ in events] == ["order.placed", "order.completed"]
        assert {event_id.split(".")[0] for _, event_id in events} == {str(partition)}
    await mine.close()
    await admin.close()
    # Nothing more is sent for it: the group has the entries acknowledged.
    assert smtp_server.message_ids().count(message_id) == 1
    # The doorbell turned on keyspace notifications of XADD on every primary.
    for node in view.primaries():
        flags = await _notify_flags(node.port)
        assert "E" in flags and ("t" in flags or "A" in flags), (node.port, flags)
    pending = await client.app[appkeys.REDIS].xpending(keys.events(partition), keys.MAIL_GROUP)
    assert pending["pending"] == 0


async def shop_redis_get(client: TestClient, key: str) -> str | None:
    value = await client.app[appkeys.REDIS].get(key)
    return value.decode() if isinstance(value, bytes) else value


async def _notify_flags(port: int) -> str:
    node = Redis(host="127.0.0.1", port=port, decode_responses=True)
    try:
        return (await node.config_get("notify-keyspace-events"))["notify-keyspace-events"]
    finally:
        await node.aclose()
