"""What the test files share that is not a fixture: the admin token, the API driver
(``Shop``), the no-shedding environment, a snapshot of every key, waiting for the saga
to settle, a WebSocket upgrade's headers and the headless browser. Fixtures live in
conftest.py and its plugins; processes in loadtests/support/; waiting in app/ops/poll.py."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app import keys, metrics
from app.ops.poll import wait_until_async
from app.ops.redis_cluster import LocalCluster
from app.partitions import PARTITIONS, partition_of
from app.redis_gateway import decode_hash
from app.vocabulary import ORDER_STATUSES
from loadtests.support.servers import free_port
from nginx.render import NginxConfig

ADMIN_TOKEN = "test-admin-token-0123456789"

# What a test of a race or of idempotency needs: every request of its burst
# reaches the handler. The adaptive limit (app/overload.py) shrinks when a
# loaded box makes answers slow, and new work may only fill 80% of it, so a
# few of a 500-request burst were refused 503 `overloaded` now and then. A
# fixed cap (OVERLOAD_ADAPTIVE=0, no queue-time refusals either) well above
# any burst keeps those tests about what they name; tests/test_overload.py
# covers the shedding itself.
NO_SHEDDING_ENV = {"OVERLOAD_ADAPTIVE": "0", "MAX_INFLIGHT": "2000"}


def without_shedding(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """app_env with NO_SHEDDING_ENV set, for a module's own ``app_env`` fixture."""
    for name, value in NO_SHEDDING_ENV.items():
        monkeypatch.setenv(name, value)
    return {**app_env, **NO_SHEDDING_ENV}


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

# The data tiers a test of the API can run on (conftest.py: stack_kind). A test or module
# marked ON_BOTH_STACKS runs once on each; `-m cluster` selects the cluster runs and
# `-m "not cluster"` leaves them out.
ONE_NODE = "one-node"
CLUSTER = "cluster"
ON_BOTH_STACKS = pytest.mark.parametrize(
    "stack_kind", [ONE_NODE, pytest.param(CLUSTER, marks=pytest.mark.cluster)], indirect=True
)
# How long a test waits for the saga's settling (50 ms after an answer, app/orders/settler.py)
# to leave the shop at rest; generous for a busy shared box.
REST_DEADLINE = 30.0


@dataclass
class Placement:
    """Which primary serves a key: on the cluster, the slot the cluster itself computes
    (CLUSTER KEYSLOT) looked up in its CLUSTER NODES; on one redis-server, one name."""

    redis: Redis
    cluster: LocalCluster | None

    @property
    def on_cluster(self) -> bool:
        return self.cluster is not None

    async def primary(self, key: str) -> str:
        if self.cluster is None:
            return ONE_NODE
        slot = int(await self.redis.cluster_keyslot(key))
        topology = await asyncio.to_thread(self.cluster.topology)
        return topology.primary_for_slot(slot).address


_emails = itertools.count()


@dataclass
class Shop:
    """Drives the API as a client would: admin set-up and customer calls."""

    client: TestClient

    async def phone(self, price_cents: int = 10_000, stock: int = 10, name: str = "Pixel") -> dict:
        response = await self.client.post(
            "/phones",
            json={"name": name, "price_cents": price_cents, "stock": stock},
            headers=ADMIN,
        )
        assert response.status == 201, await response.text()
        return (await response.json())["phone"]

    async def customer(self, balance_cents: int = 1_000_000) -> tuple[dict, dict[str, str]]:
        """A new customer and the Authorization header of their token."""
        response = await self.client.post(
            "/customers",
            json={
                "name": "Ada",
                "surname": "Lovelace",
                "email": f"ada{next(_emails)}@example.com",
                "balance_cents": balance_cents,
            },
            headers=ADMIN,
        )
        assert response.status == 201, await response.text()
        body = await response.json()
        return body["customer"], {"Authorization": f"Bearer {body['token']}"}

    async def order(self, auth: dict[str, str], lines: list[tuple[str, int]], **extra: Any):
        return await self.client.post(
            "/orders",
            json={"items": [{"phone_id": p, "quantity": q} for p, q in lines], **extra},
            headers=auth,
        )

    async def audit(self) -> dict:
        response = await self.client.get("/admin/audit", headers=ADMIN)
        assert response.status == 200
        return await response.json()

    async def audit_at_rest(self) -> dict:
        """The audit once it ran at rest (every at-rest check then ran): on the cluster
        the saga settles reservations just after the answers, so right after a burst
        units may still be held."""
        return await wait_until_async(self._audit_if_at_rest, "an audit at rest", REST_DEADLINE)

    async def _audit_if_at_rest(self) -> dict | None:
        audit = await self.audit()
        return audit if audit["at_rest"] else None


async def status_chunks(redis: Redis, partition: int, status: str) -> list[str]:
    """The keys of a partition's status chunks in its directory, oldest first."""
    chunks = await redis.zrange(keys.order_chunks(partition, status), 0, -1)
    return [keys.orders_by_status(partition, status, int(chunk)) for chunk in chunks]


async def every_status_chunk(redis: Redis) -> list[tuple[int, str, str]]:
    """(partition, status, chunk key) of every status chunk in a directory."""
    async with redis.pipeline(transaction=False) as pipe:
        pairs = [(p, s) for p in range(PARTITIONS) for s in ORDER_STATUSES]
        for p, s in pairs:
            pipe.zrange(keys.order_chunks(p, s), 0, -1)
        directories = await pipe.execute()
    return [
        (p, s, keys.orders_by_status(p, s, int(chunk)))
        for (p, s), chunks in zip(pairs, directories, strict=True)
        for chunk in chunks
    ]


async def orders_stored(redis: Redis) -> int:
    """Orders in every partition's status chunks (each order is in exactly one)."""
    chunks = await every_status_chunk(redis)
    async with redis.pipeline(transaction=False) as pipe:
        for _, _, chunk in chunks:
            pipe.zcard(chunk)
        return sum(await pipe.execute())


async def customer_order_ids(redis: Redis, customer_id: str) -> list[str]:
    """A customer's order ids as its status indexes hold them, newest first (on a
    client with or without decode_responses)."""
    scored: list[tuple[float, str]] = []
    for status in ORDER_STATUSES:
        index = keys.customer_orders_by_status(customer_id, status)
        for member, score in await redis.zrange(index, 0, -1, withscores=True):
            scored.append((score, member if isinstance(member, str) else member.decode()))
    return [member for _, member in sorted(scored, reverse=True)]


async def all_events(redis: Redis) -> list[tuple[Any, dict[Any, Any]]]:
    """Every partition's events stream, partition after partition (app/keys.py: events):
    in order within a partition, which is all the order there is."""
    async with redis.pipeline(transaction=False) as pipe:
        for partition in range(PARTITIONS):
            pipe.xrange(keys.events(partition))
        streams = await pipe.execute()
    return [entry for entries in streams for entry in entries]


async def all_keys(redis: Redis, pattern: str = "*") -> list[bytes]:
    """KEYS over the whole shop: on a cluster, every primary's (the library sends KEYS
    to one node unless told otherwise, which would see a third of the keys)."""
    if isinstance(redis, RedisCluster):
        return await redis.keys(pattern, target_nodes=RedisCluster.PRIMARIES)
    return await redis.keys(pattern)


async def snapshot(redis: Redis) -> dict[bytes, Any]:
    """Every key's content: the same before and after a refused call means it changed
    nothing. A key's DUMP, but a hash's or a set's sorted items: a large one's DUMP
    follows its table's internal order, which a mere read may change (Redis rehashes a
    growing table a step at each lookup)."""
    contents: dict[bytes, Any] = {}
    for key in sorted(await all_keys(redis)):
        kind = await redis.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "hash":
            contents[key] = sorted((await redis.hgetall(key)).items())
        elif kind == "set":
            contents[key] = sorted(await redis.smembers(key))
        else:
            contents[key] = await redis.dump(key)
    return contents


async def settled(redis: Redis) -> None:
    """Wait until no unit is held by the split reservation saga: a commit's units move
    from held to sold in a batch up to 50 ms after its 201, so a read right after an
    answer sees the order still in motion. Collapsed (place_order) nothing is ever held."""

    async def nothing_held() -> bool:
        async with redis.pipeline(transaction=False) as pipe:
            for partition in range(PARTITIONS):
                pipe.hget(keys.ledger(partition), "held_units")
            return not any(int(held or 0) for held in await pipe.execute())

    await wait_until_async(nothing_held, "the saga's reservations to be settled", 30)


# The headers of a WebSocket upgrade request (RFC 6455 4.1), for raw requests.
UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(),
}


# The headless browser of the /live and /docs page tests.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def nginx_in_front_of(
    upstreams: tuple[str, ...], directory: Path, env: dict[str, str]
) -> NginxConfig:
    """A one-worker nginx of a test's own on a free port, in front of ``upstreams``,
    with the settings ``env`` gives and its files in ``directory``."""
    return dataclasses.replace(
        NginxConfig.from_env(env),
        upstreams=upstreams,
        http_port=free_port(),
        seed_phones_port=0,
        seed_orders_port=0,
        worker_processes="1",
        var_dir=str(directory / "var"),
        access_log=str(directory / "access.log"),
        error_log="stderr",
    )


CALLS = "phoneshop_redis_call_duration_seconds_count"


def timed(call: str) -> float:
    """How many Redis calls labelled ``call`` this process has timed so far."""
    metrics.flush()  # the updates of this loop turn, written now
    return REGISTRY.get_sample_value(CALLS, {"call": call}) or 0.0


def gateway_calls() -> float:
    """How many Redis calls the gateway has timed in this process so far, of every label:
    each is one round trip (to each node a cluster pipeline spans). It counts where a
    transport cannot: the cluster gateway sends its scripts past its transport."""
    metrics.flush()
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        for sample in metric.samples
        if sample.name == CALLS
    )


# ---- escrow's stripes (docs/escrow.md) ---------------------------------------------------


def other_hosts(gateway: Any, phone_id: str) -> list[int]:
    """The host partitions (app/cluster_gateway.py: host_partitions) of every primary but
    the one serving the phone: where its stripes live. The gateway's slot map is known
    once it made a call."""
    own = gateway.host_partition(partition_of(phone_id))
    hosts = gateway.host_partitions()
    assert own in hosts, (own, hosts)
    return [host for host in hosts if host != own]


async def customer_apart_from(shop: Shop, gateway: Any, phone_id: str) -> tuple[dict, dict, int]:
    """A new customer (with 100,000 cents) on another primary than the phone's, its
    Authorization header, and its primary's host partition: where a stripe of the phone
    serves its orders. Customers land on random partitions, so this makes a few."""
    phone_host = gateway.host_partition(partition_of(phone_id))
    for _ in range(50):
        customer, auth = await shop.customer(balance_cents=100_000)
        host = gateway.host_partition(partition_of(customer["id"]))
        if host != phone_host:
            return customer, auth, host
    raise AssertionError("no customer on another primary than the phone's")


class CountingGateway:
    """A gateway's calls recorded, one entry per round trip (to each node a cluster
    pipeline spans, in parallel): the command names sent in it. The rest is the gateway's."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.round_trips: list[list[str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def execute(self, *args: Any) -> Any:
        self.round_trips.append([args[0]])
        return await self.inner.execute(*args)

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        self.round_trips.append([command[0] for command in commands])
        return await self.inner.execute_many(commands)

    async def hgetall(self, key: str) -> dict[str, str]:
        return decode_hash(await self.execute("HGETALL", key))

    async def hgetall_many(self, keys: list[str]) -> list[dict[str, str]]:
        return [decode_hash(row) for row in await self.execute_many([("HGETALL", k) for k in keys])]

    async def read_strings_with(self, keys: Any, commands: list[tuple[Any, ...]]) -> Any:
        self.round_trips.append(["strings", *(command[0] for command in commands)])
        return await self.inner.read_strings_with(keys, commands)
