"""The gateway on a real Redis Cluster (app/cluster_gateway.py): scripts routed by key,
[EVALSHA, WAIT] on one connection of the key's primary, NOSCRIPT reloaded, a WAIT
shortfall answered 503 write_unconfirmed, never a silent success; the settings
that turn it on; the app itself wired to the cluster."""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app import keys, partitions
from app.cluster_gateway import ClusterGateway, open_cluster_gateway
from app.env import SettingsError
from app.ids import new_id
from app.main import create_app
from app.ops.poll import wait_until, wait_until_async
from app.ops.redis_cluster import LocalCluster, client, poll, topology_from
from app.redis_clients import (
    closed_under_the_call,
    cluster_client,
    raise_as_lost,
    redis_client,
)
from app.redis_gateway import LuaScript, WriteUnconfirmed
from app.settings import Settings
from loadtests.gateway_cost import measure
from loadtests.support.servers import free_port
from mail.settings import MailSettings
from mail.worker import connect_redis
from tests.cluster import new_cluster
from tests.helpers import ADMIN, ADMIN_TOKEN

# Counts its runs in one hash and touches a second key of the same slot, so a
# cross-slot route or a second run shows in the figures.
COUNT = LuaScript.of(
    "test_count",
    "redis.call('SET', KEYS[2], ARGV[1]) return redis.call('HINCRBY', KEYS[1], 'n', 1)",
)
# The replica stays stopped well past REDIS_WAIT_MS and well inside min-replicas-max-lag.
WAIT_MS = 300


def nodes_of(cluster: LocalCluster) -> tuple[tuple[str, int], ...]:
    return tuple(("127.0.0.1", port) for port in cluster.ports[:3])


@pytest.fixture(scope="module")
def fault_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A cluster for this module's kill -9 tests (both soak: make test never starts it):
    each leaves it healthy again (the old primary back as a replica), so they share it
    rather than start one each."""
    cluster = new_cluster(tmp_path_factory.mktemp("fault-cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
async def gateway(redis_cluster: LocalCluster) -> AsyncIterator[ClusterGateway]:
    opened = open_cluster_gateway(
        "redis://127.0.0.1/0", nodes_of(redis_cluster), 1, WAIT_MS, 2.0, 8
    )
    yield opened
    await opened.aclose()


def owner_and_replica(cluster: LocalCluster, key: str) -> tuple[int, int]:
    """Ports of the primary serving ``key`` and of its one replica, as the cluster says."""
    view = cluster.topology()
    with client(cluster.ports[0]) as node:
        slot = node.execute_command("CLUSTER", "KEYSLOT", key)
    primary = view.primary_for_slot(slot)
    (replica,) = view.replicas_of(primary)
    return primary.port, replica.port


@contextmanager
def stopped(cluster: LocalCluster, port: int) -> Iterator[None]:
    """The node on ``port`` frozen (SIGSTOP), and always thawed again."""
    cluster.procs[port].send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        cluster.procs[port].send_signal(signal.SIGCONT)


def read_on_replica(port: int, key: str) -> str | None:
    with client(port) as replica:
        replica.execute_command("READONLY")
        return replica.hget(key, "n")


async def test_a_script_runs_once_on_the_primary_of_its_keys_and_its_replica_has_it(
    redis_cluster: LocalCluster, gateway: ClusterGateway
) -> None:
    tag = new_id()
    counter, marker = f"count{{{tag}}}", f"marker{{{tag}}}"
    primary, replica = owner_and_replica(redis_cluster, counter)

    assert await gateway.run_script(COUNT, [counter, marker], ["first"]) == 1
    assert await gateway.run_script(COUNT, [counter, marker], ["second"]) == 2

    with client(primary) as node:
        assert node.hget(counter, "n") == "2"
        assert node.get(marker) == "second"
    # WAIT answered 1 before the reply came back: the replica already holds it.
    assert read_on_replica(replica, counter) == "2"


async def test_noscript_after_script_flush_reloads_everywhere_and_runs_once(
    redis_cluster: LocalCluster, gateway: ClusterGateway
) -> None:
    tag = new_id()
    counter, marker = f"count{{{tag}}}", f"marker{{{tag}}}"
    primary, replica = owner_and_replica(redis_cluster, counter)
    assert await gateway.run_script(COUNT, [counter, marker], ["x"]) == 1

    with client(primary) as node:
        node.execute_command("SCRIPT", "FLUSH")
        assert node.execute_command("SCRIPT", "EXISTS", COUNT.sha) == [0]

    # NOSCRIPT means it did not run: loaded again, run once, and still confirmed.
    assert await gateway.run_script(COUNT, [counter, marker], ["y"]) == 2
    for port in {n.port for n in redis_cluster.topology().primaries()}:
        with client(port) as node:
            assert node.execute_command("SCRIPT", "EXISTS", COUNT.sha) == [1], port
    assert read_on_replica(replica, counter) == "2"


async def test_a_wait_that_hears_no_replica_raises_write_unconfirmed(
    redis_cluster: LocalCluster, gateway: ClusterGateway
) -> None:
    tag = new_id()
    counter, marker = f"count{{{tag}}}", f"marker{{{tag}}}"
    primary, replica = owner_and_replica(redis_cluster, counter)
    assert await gateway.run_script(COUNT, [counter, marker], ["before"]) == 1

    with stopped(redis_cluster, replica), pytest.raises(WriteUnconfirmed) as raised:
        await gateway.run_script(COUNT, [counter, marker], ["unconfirmed"])
    assert (raised.value.replicas, raised.value.wanted) == (0, 1)
    assert raised.value.reply == 2  # the script's own answer travels with the error
    # The write is on the primary: only its copy was not confirmed.
    with client(primary) as node:
        assert node.hget(counter, "n") == "2"

    # Thawed, the replica catches up and the next write is confirmed again.
    poll(lambda: read_on_replica(replica, counter) == "2", 30, "the replica to catch up")
    assert await gateway.run_script(COUNT, [counter, marker], ["after"]) == 3
    redis_cluster.wait_healthy()


async def test_the_single_slot_commands_and_pipelines_route_by_key(
    redis_cluster: LocalCluster, gateway: ClusterGateway
) -> None:
    """The gateway's reads: keys of different slots, each from its own primary."""
    # Partitions 0, 64 and 127 are slots 0, 8192 and 16256, in three primaries' ranges
    # as the cluster is created (random keys shared one primary about 1 run in 243).
    names = [f"row:{{{partitions.tag(p)}}}{new_id()}" for p in (0, 21, 64, 85, 100, 127)]
    admin = cluster_client("redis://127.0.0.1/0", nodes_of(redis_cluster))
    try:
        for name in names:
            await admin.hset(name, mapping={"id": name})
        assert len({admin.get_node_from_key(name).name for name in names}) > 1
        assert await gateway.hgetall(names[0]) == {"id": names[0]}
        assert await gateway.hgetall_many(names) == [{"id": name} for name in names]
        assert await gateway.get(f"absent:{new_id()}") is None
        await admin.delete(*names)
    finally:
        await admin.aclose()


def test_settings_turn_the_cluster_and_its_wait_on_together() -> None:
    base = {"ADMIN_TOKEN": ADMIN_TOKEN}
    single = Settings.from_env(base)
    assert (single.redis_cluster_nodes, single.redis_wait_replicas) == ((), 0)
    assert not single.saga_always_split, "one redis-server collapses the saga"

    cluster = Settings.from_env({**base, "REDIS_CLUSTER_NODES": " 10.0.0.1:7001, node-b:7002 "})
    assert cluster.redis_cluster_nodes == (("10.0.0.1", 7001), ("node-b", 7002))
    assert (cluster.redis_wait_replicas, cluster.redis_wait_ms) == (1, 500)
    assert "node-b" in repr(cluster)

    chosen = Settings.from_env(
        {**base, "REDIS_CLUSTER_NODES": "h:1", "REDIS_WAIT_REPLICAS": "0", "REDIS_WAIT_MS": "50"}
    )
    assert (chosen.redis_wait_replicas, chosen.redis_wait_ms) == (0, 50)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_CLUSTER_NODES": "127.0.0.1"}, "host:port"),
        ({"REDIS_CLUSTER_NODES": "127.0.0.1:0"}, "host:port"),
        ({"REDIS_CLUSTER_NODES": ":7001"}, "host:port"),
        ({"REDIS_CLUSTER_NODES": "h:7001,h:x"}, "host:port"),
        ({"REDIS_WAIT_REPLICAS": "1"}, "needs REDIS_CLUSTER_NODES"),
        ({"REDIS_CLUSTER_NODES": "h:1", "REDIS_WAIT_REPLICAS": "-1"}, "REDIS_WAIT_REPLICAS"),
        ({"REDIS_CLUSTER_NODES": "h:1", "REDIS_WAIT_MS": "0"}, "REDIS_WAIT_MS"),
        ({"REDIS_CLUSTER_NODES": "h:1", "REDIS_WAIT_MS": "2000"}, "below REDIS_TIMEOUT"),
        ({"REDIS_CLUSTER_NODES": "h:1", "REDIS_URL": "unix:///tmp/r.sock"}, "redis://"),
    ],
)
def test_settings_refuse_a_cluster_they_cannot_use(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({"ADMIN_TOKEN": ADMIN_TOKEN, **env})


async def test_the_other_redis_users_get_a_cluster_client(redis_cluster: LocalCluster) -> None:
    """The events' reader and the mail worker take the same factory: one stream key
    written and read back through the cluster, whichever primary serves it."""
    nodes = ",".join(f"127.0.0.1:{port}" for port in redis_cluster.ports)
    worker = connect_redis(MailSettings.from_env({"REDIS_CLUSTER_NODES": nodes}))
    reader = redis_client("redis://127.0.0.1/0", nodes_of(redis_cluster), socket_timeout=2)
    stream = f"stream:{new_id()}"
    try:
        assert isinstance(worker, RedisCluster) and isinstance(reader, RedisCluster)
        entry = await worker.xadd(stream, {"type": "test"})
        [[name, [(read_id, fields)]]] = await reader.xread({stream: "0"})
        assert (name, read_id, fields) == (stream.encode(), entry.encode(), {b"type": b"test"})
        await worker.delete(stream)
    finally:
        await worker.aclose()
        await reader.aclose()


async def app_on_cluster(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch, ports: Sequence[int], **settings: str
) -> TestClient:
    """The app (create_app) on the cluster whose start-up nodes are on ``ports``, with
    ``settings`` beside its address and the admin token."""
    for name, value in {
        "REDIS_URL": "redis://127.0.0.1/0",
        "REDIS_CLUSTER_NODES": ",".join(f"127.0.0.1:{port}" for port in ports),
        "ADMIN_TOKEN": ADMIN_TOKEN,
        **settings,
    }.items():
        monkeypatch.setenv(name, value)
    return await aiohttp_client(await create_app())


@pytest.fixture
async def cluster_app(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch, redis_cluster: LocalCluster
) -> TestClient:
    return await app_on_cluster(
        aiohttp_client, monkeypatch, redis_cluster.ports[:3], REDIS_WAIT_MS=str(WAIT_MS)
    )


async def test_the_app_on_the_cluster_is_ready_and_answers_an_unconfirmed_write_with_503(
    redis_cluster: LocalCluster, cluster_app: TestClient
) -> None:
    # Ready means every script is loaded, here on every primary.
    ready = await cluster_app.get("/readyz")
    assert ready.status == 200, await ready.text()

    created = await cluster_app.post(
        "/phones", json={"name": "Cluster phone", "price_cents": 1000, "stock": 5}, headers=ADMIN
    )
    assert created.status == 201, await created.text()
    phone_id = (await created.json())["phone"]["id"]
    renamed = await cluster_app.patch(f"/phones/{phone_id}", json={"name": "A"}, headers=ADMIN)
    assert renamed.status == 200, await renamed.text()
    assert (await renamed.json())["phone"]["name"] == "A"
    assert (await (await cluster_app.get(f"/phones/{phone_id}")).json())["phone"]["name"] == "A"

    _, replica = owner_and_replica(redis_cluster, keys.phone(phone_id))
    with stopped(redis_cluster, replica):
        refused = await cluster_app.patch(f"/phones/{phone_id}", json={"name": "B"}, headers=ADMIN)
    assert refused.status == 503
    assert refused.headers["Content-Type"].startswith("application/problem+json")
    assert refused.headers["Retry-After"] == "1"
    problem = await refused.json()
    assert problem["code"] == "write_unconfirmed"
    assert "Idempotency-Key" in problem["detail"]
    redis_cluster.wait_healthy()


async def test_an_order_step_its_replica_did_not_confirm_is_503_and_a_retry_replays_it(
    redis_cluster: LocalCluster, cluster_app: TestClient
) -> None:
    """The order's steps (the stock reserve, the commit) run with Scripts.call, which
    raises the WAIT shortfall as it is: that was a 500 (tests/test_cluster_failover.py
    met it under a failover). It is 503 write_unconfirmed; the commit's names the order,
    and the retry with the same Idempotency-Key replays that order."""
    created = await cluster_app.post(
        "/phones", json={"name": "Unconfirmed", "price_cents": 1000, "stock": 5}, headers=ADMIN
    )
    assert created.status == 201, await created.text()
    phone_id = (await created.json())["phone"]["id"]
    phone_primary, phone_replica = owner_and_replica(redis_cluster, keys.phone(phone_id))
    view = redis_cluster.topology()
    email = next(
        e
        for e in (f"unconfirmed-{new_id()}@example.com" for _ in range(10_000))
        if view.primary_for_slot(partitions.slot(partitions.partition_for_email(e))).port
        != phone_primary
    )
    made = await cluster_app.post(
        "/customers",
        json={"name": "U", "surname": "C", "email": email, "balance_cents": 10_000},
        headers=ADMIN,
    )
    assert made.status == 201, await made.text()
    customer = await made.json()
    auth = {"Authorization": f"Bearer {customer['token']}"}
    _, customer_replica = owner_and_replica(
        redis_cluster, keys.customer(customer["customer"]["id"])
    )
    order = {"items": [{"phone_id": phone_id, "quantity": 1}]}

    with stopped(redis_cluster, phone_replica):
        reserve_unconfirmed = await cluster_app.post("/orders", json=order, headers=auth)
    with stopped(redis_cluster, customer_replica):
        commit_unconfirmed = await cluster_app.post(
            "/orders", json=order, headers={**auth, "Idempotency-Key": "unconfirmed-1"}
        )
    for refused in (reserve_unconfirmed, commit_unconfirmed):
        assert refused.status == 503, await refused.text()
        assert refused.headers["Content-Type"].startswith("application/problem+json")
        assert refused.headers["Retry-After"] == "1"
        assert (await refused.json())["code"] == "write_unconfirmed"
    order_id = (await commit_unconfirmed.json())["order_id"]

    retried = await cluster_app.post(
        "/orders", json=order, headers={**auth, "Idempotency-Key": "unconfirmed-1"}
    )
    assert retried.status == 201, await retried.text()
    assert retried.headers["Idempotent-Replayed"] == "true"
    assert (await retried.json())["order"]["id"] == order_id
    redis_cluster.wait_healthy()


# soak: make test has a failover through the app (test_cluster_failover's small run).
@pytest.mark.soak
async def test_after_a_failover_the_gateway_follows_the_slots_and_reloads_its_scripts(
    fault_cluster: LocalCluster,
) -> None:
    """kill -9 of the primary of a key: the gateway's next call goes to the old
    address (now a replica, MOVED), the library follows it to the new primary, which
    never loaded the script (NOSCRIPT), loads it, runs it once, and the write is
    confirmed by the old primary, back as the new one's replica."""
    cluster = fault_cluster
    gateway = open_cluster_gateway("redis://127.0.0.1/0", nodes_of(cluster), 1, 1000, 2.0, 8)
    try:
        tag = new_id()
        counter, marker = f"count{{{tag}}}", f"marker{{{tag}}}"
        old_primary, heir = owner_and_replica(cluster, counter)
        assert await gateway.run_script(COUNT, [counter, marker], ["before"]) == 1

        cluster.kill(old_primary)
        witness = next(p for p in cluster.ports if p not in (old_primary, heir))

        def heir_serves() -> bool:
            view = topology_from(witness)
            return view is not None and view.by_port(heir).role == "primary"

        def fail_over_and_rejoin() -> None:
            poll(heir_serves, 60, "the replica to take over")
            # Back as the heir's replica: until then the heir refuses writes (NOREPLICAS,
            # min-replicas-to-write 1), which is the promise of section 6 at work.
            cluster.start_node(old_primary)
            cluster.wait_healthy()

        # In a thread, so this event loop runs meanwhile as an app's does: it sees the
        # gateway's pooled sockets to the killed node close.
        await asyncio.to_thread(fail_over_and_rejoin)
        with client(heir) as node:
            assert node.execute_command("SCRIPT", "EXISTS", COUNT.sha) == [0]

        assert await gateway.run_script(COUNT, [counter, marker], ["after"]) == 2
        with client(heir) as node:
            assert node.hget(counter, "n") == "2"
        assert read_on_replica(old_primary, counter) == "2"
    finally:
        await gateway.aclose()


async def test_an_app_whose_cluster_does_not_answer_is_not_ready_and_says_503(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It starts anyway (make run and compose start it beside the cluster), and every
    Redis call is a 503 with Retry-After until the cluster answers, never a 500."""
    app = await app_on_cluster(aiohttp_client, monkeypatch, [free_port()])
    for path in ("/readyz", f"/phones/{new_id()}"):
        answer = await app.get(path)
        assert answer.status == 503, (path, await answer.text())
        assert answer.headers["Retry-After"] == "1"
        assert (await answer.json())["code"] == "service_unavailable"


async def test_a_cluster_gone_after_its_map_was_learnt_is_a_connection_error(
    tmp_path: Path,
) -> None:
    """kill -9 of every node once the gateway knows the slot map: a script's send finds no
    node, the map cannot be read again, and each kind of call is a ConnectionError (503 +
    Retry-After), as one redis-server that went away; never redis-py's
    RedisClusterException, which the app answers 500 (CI of 2026-12-03: one 500 amid a
    primary's failover, tests/test_cluster_failover.py)."""
    cluster = new_cluster(tmp_path, primaries=1, replicas=1)
    cluster.start()
    gateway = open_cluster_gateway("redis://127.0.0.1/0", nodes_of(cluster), 1, WAIT_MS, 2.0, 8)
    counter = f"count{{{new_id()}}}"
    marker = f"marker{{{counter[6:-1]}}}"
    try:
        assert await gateway.run_script(COUNT, [counter, marker], ["x"]) == 1
        for port in list(cluster.procs):
            cluster.kill(port)
        with pytest.raises(RedisConnectionError):
            await gateway.run_script(COUNT, [counter, marker], ["x"])
        with pytest.raises(RedisConnectionError):
            await gateway.execute("HGET", counter, "n")
        with pytest.raises(RedisConnectionError):
            await gateway.execute_many([("HGET", counter, "n"), ("GET", marker)])
    finally:
        await gateway.aclose()
        cluster.stop()


async def test_a_slot_without_a_primary_is_503_until_it_is_served_again(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Mid-failover a slot may have no primary: the node answers CLUSTERDOWN and the slot
    map redis-py reads again does not cover every slot. The app answers 503 + Retry-After
    (service_unavailable), not 500, and serves again once the slot is."""
    cluster = new_cluster(tmp_path, primaries=1, replicas=0)
    cluster.start()
    try:
        (port,) = cluster.ports
        app = await app_on_cluster(aiohttp_client, monkeypatch, [port], REDIS_WAIT_REPLICAS="0")
        phone = new_id()
        path, slot = f"/phones/{phone}", partitions.slot(partitions.partition_of(phone))
        assert (await app.get(path)).status == 404  # the map is learnt
        with client(port) as node:
            node.execute_command("CLUSTER", "DELSLOTS", slot)
        answer = await app.get(path)
        assert answer.status == 503, await answer.text()
        assert answer.headers["Retry-After"] == "1"
        assert (await answer.json())["code"] == "service_unavailable"
        with client(port) as node:
            node.execute_command("CLUSTER", "ADDSLOTS", slot)

        async def served() -> bool:
            return (await app.get(path)).status == 404

        await wait_until_async(served, "the slot served again", 30)
    finally:
        cluster.stop()


# Counts its run like COUNT, then keeps its primary busy for half a second: longer
# than the gateway's socket timeout below, shorter than the cluster's node timeout.
SLOW_COUNT = LuaScript.of(
    "test_slow_count",
    """local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
local t = redis.call('TIME')
repeat
  local now = redis.call('TIME')
until (now[1] - t[1]) * 1000000 + (now[2] - t[2]) > 500000
return n""",
)


async def test_a_script_whose_reply_never_came_is_not_sent_again(
    redis_cluster: LocalCluster,
) -> None:
    """It ran, and its reply came after the socket timed out: today's scripts are not
    all safe to run twice, so the caller gets the timeout (503: retry with the same
    Idempotency-Key) and the gateway does not send the script again."""
    gateway = open_cluster_gateway("redis://127.0.0.1/0", nodes_of(redis_cluster), 1, 100, 0.3, 8)
    counter = f"count{{{new_id()}}}"
    primary, _ = owner_and_replica(redis_cluster, counter)
    try:
        # Loaded first, so the call below runs on its first send (no NOSCRIPT detour).
        await gateway.execute("SCRIPT", "LOAD", SLOW_COUNT.source)
        with pytest.raises(RedisTimeoutError):
            await gateway.run_script(SLOW_COUNT, [counter], [])
        # Read once the script is done (Redis runs one thing at a time): it ran once.
        with client(primary, timeout=5) as node:
            assert node.hget(counter, "n") == "1"
        assert await gateway.run_script(COUNT, [counter, f"marker{{{counter[6:-1]}}}"], ["x"]) == 2
    finally:
        await gateway.aclose()
    redis_cluster.wait_healthy()


READ = LuaScript.of("test_read", "return redis.call('HGET', KEYS[1], 'n')")


async def test_an_answer_that_reads_an_unreplicated_write_is_unconfirmed_too(
    redis_cluster: LocalCluster, gateway: ClusterGateway
) -> None:
    """A script that writes nothing (an Idempotency-Key replay, a check answered again)
    answers from earlier writes: those must be on the replica too before it counts.
    (Redis 7.0, here, makes WAIT wait for the offset of the connection's previous
    command, whatever it was; from 7.2 only for its last write, redis PR #12439, which
    is why the gateway writes its ack key before WAIT: this holds on both.)"""
    counter = f"count{{{new_id()}}}"
    primary, replica = owner_and_replica(redis_cluster, counter)
    assert await gateway.run_script(READ, [counter], []) is None  # confirmed: nothing pending

    with stopped(redis_cluster, replica):
        with client(primary) as other_connection:  # the write being answered from
            other_connection.hset(counter, "n", 7)
        with pytest.raises(WriteUnconfirmed) as raised:
            await gateway.run_script(READ, [counter], [])
    assert raised.value.reply == b"7"
    poll(lambda: read_on_replica(replica, counter) == "7", 30, "the replica to catch up")
    assert await gateway.run_script(READ, [counter], []) == b"7"
    redis_cluster.wait_healthy()


PUT = LuaScript.of("test_put", "return redis.call('SET', KEYS[1], ARGV[1])")


# soak: make test has the same kill -9 through the app (test_cluster_failover's small run).
@pytest.mark.soak
async def test_every_acknowledged_write_survives_kill_9_of_its_primary(
    fault_cluster: LocalCluster, record_property: pytest.RecordProperty
) -> None:
    """docs/data-tier.md, section 6, under a crash: writes keep coming to one primary's
    slots while it is SIGKILLed; its replica takes over, the old primary comes back as
    the heir's replica (until then the heir refuses writes: min-replicas-to-write 1),
    and every write the gateway acknowledged is on the new primary. The failures in
    between are 503s the client retries, never a success that was lost.

    make soak-tests only (with its module cluster, about 9 s): make test covers its ground
    with tests/test_cluster_failover.py's
    test_kill_9_of_a_primary_under_orders_loses_nothing_acknowledged_and_mails_all[small],
    the same kill -9 of a primary under writes through this gateway (the app's), where
    every acknowledged order must be stored on the heir."""
    cluster = fault_cluster
    gateway = open_cluster_gateway("redis://127.0.0.1/0", nodes_of(cluster), 1, 1000, 2.0, 8)
    tag = new_id()
    victim, heir = owner_and_replica(cluster, f"w{{{tag}}}")
    witness = next(p for p in cluster.ports if p not in (victim, heir))
    acknowledged: list[int] = []
    failures: collections.Counter[str] = collections.Counter()
    killed_at: float | None = None
    resumed_at: float | None = None

    async def write_until(done: asyncio.Event) -> None:
        nonlocal resumed_at
        n = 0
        while not done.is_set():
            n += 1
            try:
                await gateway.run_script(PUT, [f"w{{{tag}}}:{n}"], [n])
            except (RedisError, WriteUnconfirmed) as error:
                failures[type(error).__name__] += 1
                await asyncio.sleep(0.01)  # pacing the retries, not synchronisation
                continue
            acknowledged.append(n)
            if killed_at is not None and resumed_at is None:
                resumed_at = time.monotonic()

    def crash_and_recover() -> None:
        nonlocal killed_at
        wait_until(lambda: len(acknowledged) >= 50, "50 acknowledged writes", 30)
        cluster.kill(victim)
        killed_at = time.monotonic()
        wait_until(
            lambda: (
                (view := topology_from(witness)) is not None
                and view.by_port(heir).role == "primary"
            ),
            "the replica to take over",
            60,
        )
        cluster.start_node(victim)
        cluster.wait_healthy()
        before = len(acknowledged)
        wait_until(lambda: len(acknowledged) >= before + 50, "50 writes after recovery", 60)

    done = asyncio.Event()
    writer = asyncio.create_task(write_until(done))
    try:
        await asyncio.to_thread(crash_and_recover)
    finally:
        done.set()
        await writer
        await gateway.aclose()

    assert killed_at is not None and resumed_at is not None
    resumed_after = resumed_at - killed_at
    record_property("writes_resumed_after_kill_seconds", round(resumed_after, 2))
    print(
        f"\nwrites resumed {resumed_after:.2f} s after kill -9, {len(acknowledged)} acknowledged;"
        f" failures meanwhile: {dict(failures)}"
    )
    with client(heir) as new_primary:
        stored = new_primary.mget([f"w{{{tag}}}:{n}" for n in acknowledged])
    lost = [n for n, value in zip(acknowledged, stored, strict=True) if value != str(n)]
    assert lost == [], f"{len(lost)} of {len(acknowledged)} acknowledged writes lost"


# Idempotent like the saga's steps: a second run finds the first run's record and
# answers the same, at once. The first run keeps its primary busy for half a second.
SLOW_ONCE = LuaScript.of(
    "test_slow_once",
    """if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('GET', KEYS[1]) end
redis.call('SET', KEYS[1], ARGV[1])
local t = redis.call('TIME')
repeat
  local now = redis.call('TIME')
until (now[1] - t[1]) * 1000000 + (now[2] - t[2]) > 500000
return ARGV[1]""",
    rerunnable=True,
)


async def test_a_rerunnable_script_whose_reply_never_came_is_run_again_and_confirmed(
    redis_cluster: LocalCluster,
) -> None:
    """The same lost reply as above, for a script marked safe to run twice: the gateway
    sends it again through the library (it answers from its first run's record) and
    proves that with [SET, WAIT] on the primary, so the caller gets the answer."""
    # 0.45 s: the first run's reply (0.5 s of work) always comes too late, the second's
    # (queued behind it, then instant) well within.
    gateway = open_cluster_gateway("redis://127.0.0.1/0", nodes_of(redis_cluster), 1, 300, 0.45, 8)
    record = f"record{{{new_id()}}}"
    try:
        await gateway.execute("SCRIPT", "LOAD", SLOW_ONCE.source)  # no NOSCRIPT detour
        assert await gateway.run_script(SLOW_ONCE, [record], ["first"]) == b"first"
    finally:
        await gateway.aclose()
    primary, replica = owner_and_replica(redis_cluster, record)
    with client(primary) as node:
        assert node.get(record) == "first"
    with client(replica) as node:
        node.execute_command("READONLY")
        assert node.get(record) == "first"
    redis_cluster.wait_healthy()


async def test_the_gateway_cost_harness_runs_every_call_through_the_cluster(
    redis_cluster: LocalCluster,
) -> None:
    """loadtests/gateway_cost.py's cluster + WAIT 1 row: each of its calls incremented a
    counter on the primary of its partition, and the CPU figures come from real work."""
    prefix = f"cost-{new_id()}"
    gateway = open_cluster_gateway("redis://127.0.0.1/0", nodes_of(redis_cluster), 1, 1000, 2.0, 8)
    row = await measure("cluster + WAIT 1", gateway, redis_cluster.ports, 300, 4, prefix)
    assert (row["calls"], row["inflight"]) == (300, 4)
    assert row["app_cpu_us_per_call"] > 0 and row["redis_cpu_us_per_call"] > 0
    admin = cluster_client("redis://127.0.0.1/0", nodes_of(redis_cluster))
    try:
        names = [f"{prefix}{{{partitions.tag(p)}}}" for p in range(partitions.PARTITIONS)]
        counts = [int(await admin.hget(name, "n") or 0) for name in names]
        for name in names:
            await admin.delete(name)
    finally:
        await admin.aclose()
    assert sum(counts) == 300 + 1  # and the warm-up call


def test_a_connection_closed_under_a_call_by_the_cluster_client_reads_as_lost() -> None:
    """The two ways redis-py's cluster client failed a mail worker's call during a
    failover (tests/test_cluster_failover.py), their messages as logged then: a lost
    connection; other errors of those types stay bugs."""
    assert closed_under_the_call(
        RuntimeError(
            "unable to perform operation on <TCPTransport closed=True reading=False"
            " 0x55dd5421ef80>; the handler is closed"
        )
    )
    assert closed_under_the_call(AttributeError("'NoneType' object has no attribute 'writelines'"))
    assert not closed_under_the_call(RuntimeError("cannot reuse already awaited coroutine"))
    assert not closed_under_the_call(AttributeError("'Order' object has no attribute 'id'"))
    assert not closed_under_the_call(ValueError("closed"))


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(
            "unable to perform operation on <TCPTransport closed=True>; the handler is closed"
        ),
        AttributeError("'NoneType' object has no attribute 'writelines'"),
    ],
)
def test_a_connection_closed_under_an_app_call_is_raised_as_a_connection_error(
    error: RuntimeError | AttributeError,
) -> None:
    """The app's cluster calls (app/redis_clients.py: ClusterClient, the gateway's pipelines
    and one-connection sends) raise those as the ConnectionError they are (503 + Retry-After,
    and a rerunnable script runs again), and any other error of those types as it was."""
    with pytest.raises(RedisConnectionError) as raised:
        raise_as_lost(error)
    assert raised.value.__cause__ is error
    bug = AttributeError("'Order' object has no attribute 'id'")
    with pytest.raises(AttributeError) as raised_bug:
        raise_as_lost(bug)
    assert raised_bug.value is bug


def _script_calls(cluster: LocalCluster) -> tuple[int, int]:
    """EVALSHAs the cluster's nodes ran so far, and of those the failed ones (a replica
    gets a script's effects only)."""
    calls = failed = 0
    for port in cluster.ports:
        with client(port) as node:
            stats = node.info("commandstats").get("cmdstat_evalsha", {})
            calls, failed = (
                calls + int(stats.get("calls", 0)),
                failed + int(stats.get("failed_calls", 0)),
            )
    return calls, failed


async def test_string_keys_of_every_partition_are_one_script_per_primary(
    redis_cluster: LocalCluster, gateway: ClusterGateway
) -> None:
    """read_strings_with (the catalogue's page check reads its 128 clocks by it): the
    first read of a key set is a GET each and learns which primary serves which; the
    next are one read_strings.lua per primary, in one pipeline with the commands. Nodes
    that lost the script (SCRIPT FLUSH, a failover) refuse it, and that read falls back
    to GETs and loads it again."""
    clocks = [keys.phones_seq(p) for p in range(partitions.PARTITIONS)]
    phone = keys.phone(partitions.new_id(5))
    # The session's cluster is shared: every clock is set or cleared here.
    for p in range(partitions.PARTITIONS):
        await gateway.execute(*(("SET", clocks[p], str(p)) if p % 3 == 0 else ("DEL", clocks[p])))
    await gateway.execute("HSET", phone, "name", "x")
    expected = [str(p).encode() if p % 3 == 0 else None for p in range(partitions.PARTITIONS)]
    view = redis_cluster.topology()
    primaries = {view.primary_for_slot(partitions.slot(p)).port for p in range(128)}

    async def read() -> tuple[int, int]:
        """One read, checked; the scripts it ran, and how many of those failed."""
        calls, failed = _script_calls(redis_cluster)
        assert await gateway.read_strings_with(clocks, [("HGET", phone, "name")]) == (
            expected,
            [b"x"],
        )
        calls_after, failed_after = _script_calls(redis_cluster)
        return calls_after - calls, failed_after - failed

    assert await read() == (0, 0)  # GETs: the groups are learnt
    assert await read() == (len(primaries), 0)
    assert await read() == (len(primaries), 0)
    for port in primaries:
        with client(port) as node:
            node.execute_command("SCRIPT", "FLUSH")
    # Refused (NOSCRIPT: not run), then GETs, and the script loaded again on each.
    assert await read() == (len(primaries), len(primaries))
    assert await read() == (len(primaries), 0)
