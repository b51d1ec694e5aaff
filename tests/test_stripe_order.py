"""Escrow, build-step 2 (docs/escrow.md, section 3): an order sold from stripes,
place_from_stripe.lua on the customer's primary, on the 3+3 cluster. Its stripes are made
by the real receipt (tests/stripe_fixtures.py: the pool side of each grant by the test-only
LEND, since the grant's reserve is another step's).

- a stripe order is one script call and one round trip, and moves the stripe, the host
  ledger and the customer's side only;
- a refused one (stripe missing, closed, short, or at two epochs) writes nothing, not even
  the Idempotency-Key's record, and the saga places the same order id from the pools;
- an Idempotency-Key replayed through another instance (with or without the hints) gives
  one order;
- after the host moved (a reshard the gateway's slot map has not seen), NotOnOneNode and
  the saga with the same id;
- a lost answer (the customer's primary frozen): the stripe order is sent again, never
  the saga, and the order is placed once;
- money and units conserved (the audit at rest).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from app import appkeys, keys, partitions
from app.cluster_gateway import ClusterGateway, open_cluster_gateway
from app.customers import service as customers
from app.customers.models import CustomerCreate
from app.ops.poll import wait_until_async
from app.ops.redis_cluster import LocalCluster
from app.orders import saga, saga_service, stripes
from app.orders.service import PlacedOrder, idempotency_request
from app.orders.stripes import STRIPE_ANSWERS, STRIPE_HINTS, StripeAnswer
from app.partitions import partition_of
from app.phones import service as phones
from app.phones.models import PhoneCreate
from app.redis_gateway import gateway_over
from app.scripts import Scripts
from app.vocabulary import COMPLETED, OPEN, ORDER_FIELDS, new_order_id
from tests.cluster import new_cluster
from tests.helpers import CLUSTER, Shop, gateway_calls, settled
from tests.stripe_fixtures import grant

ON_THE_CLUSTER = pytest.mark.parametrize(
    "stack_kind", [pytest.param(CLUSTER, marks=pytest.mark.cluster)], indirect=True
)
PRICE = 250


class RecordingScripts(Scripts):
    """The app's Scripts, noting each call's script and order id (its first argument)."""

    def __init__(self, gateway: Any) -> None:
        super().__init__(gateway)
        self.calls: list[tuple[str, str]] = []

    async def call(self, name: str, keys_: list[str], args: list, *, one_node: bool = False):
        self.calls.append((name, str(args[0])))
        return await super().call(name, keys_, args, one_node=one_node)


def _no_settle(partition: int, order_id: str, outcome: str, lines: str) -> None:
    """Leaves a split order's reservations held (the tests settle them themselves)."""


async def _place(
    scripts: Scripts,
    customer_id: str,
    lines: list[tuple[str, int]],
    *,
    key: str | None = None,
    settle: saga_service.SettleSoon = _no_settle,
) -> PlacedOrder:
    return await saga_service.place_order(
        scripts,
        settle,
        customer_id=customer_id,
        lines=lines,
        autocheck=False,
        idempotency_key=key,
        idempotency_ttl=600,
        request_id="req",
        reservation_ttl_ms=10_000,
    )


def _node(gateway: ClusterGateway, partition: int) -> str:
    return gateway.cluster.get_node_from_key(keys.ledger(partition)).name


@dataclass
class World:
    scripts: RecordingScripts
    gateway: ClusterGateway
    redis: Redis
    customer_id: str
    host: int
    phones: list[str]  # each on another primary than the customer's, with a stripe on host

    async def stripe(self, phone_id: str) -> dict[str, int]:
        row = await self.redis.hgetall(keys.stripe(self.host, phone_id))
        return {k.decode(): int(v) for k, v in row.items()}

    async def pool(self, phone_id: str) -> dict[str, int]:
        row = await self.redis.hmget(keys.phone(phone_id), "stock", "held", "sold", "lent")
        return dict(zip(("stock", "held", "sold", "lent"), (int(v or 0) for v in row), strict=True))

    def every_key(self, order_id: str, phone_ids: list[str], key: str | None) -> list[str]:
        """Every key a stripe order of ``order_id`` may write, and the pools'."""
        record, _ = idempotency_request(
            self.customer_id, [(p, 1) for p in phone_ids], False, key, 600
        )
        names = stripes.place_from_stripe_keys(
            self.customer_id, order_id, OPEN, record, self.host, phone_ids
        )
        names += stripes.place_from_stripe_keys(
            self.customer_id, order_id, COMPLETED, record, self.host, phone_ids
        )
        for phone_id in phone_ids:
            names += [keys.phone(phone_id), keys.ledger(partition_of(phone_id))]
        return sorted(set(names))

    async def dump(self, names: list[str]) -> dict[str, bytes | None]:
        return {name: await self.redis.dump(name) for name in names}


async def _world(shop: Shop, redis: Redis, *, phones_wanted: int = 1, units: int = 20) -> World:
    app = shop.client.app
    gateway = app[appkeys.REDIS_GATEWAY]
    assert isinstance(gateway, ClusterGateway)
    scripts = RecordingScripts(gateway)
    customer, _ = await shop.customer(balance_cents=1_000_000)
    customer_id = customer["id"]
    home = _node(gateway, partition_of(customer_id))
    host = gateway.host_partition(partition_of(customer_id))
    assert host is not None and _node(gateway, host) == home
    apart: list[str] = []
    while len(apart) < phones_wanted:
        phone = await shop.phone(price_cents=PRICE, stock=200)
        if _node(gateway, partition_of(phone["id"])) != home:
            apart.append(phone["id"])
    for phone_id in apart:
        received = await grant(
            redis, scripts, phone_id=phone_id, host=host, units=units, price_cents=PRICE
        )
        assert received.status == 200
    scripts.calls.clear()
    return World(scripts, gateway, redis, customer_id, host, apart)


@ON_THE_CLUSTER
async def test_a_stripe_order_is_one_script_and_one_round_trip(shop: Shop, redis: Redis) -> None:
    world = await _world(shop, redis)
    (phone_id,) = world.phones
    told: list[StripeAnswer] = []
    stop = STRIPE_ANSWERS.listen(told.append)
    ledger_before = await redis.hgetall(keys.ledger(world.host))
    try:
        calls = gateway_calls()
        placed = await _place(world.scripts, world.customer_id, [(phone_id, 3)])
        assert gateway_calls() - calls == 1
    finally:
        stop()
    order = placed.order
    # place_order first: its NotOnOneNode comes from the slot map, nothing sent (the one
    # round trip above is the stripe order's).
    assert [name for name, _ in world.scripts.calls] == ["place_order", "place_from_stripe"]
    assert order.total_cents == 3 * PRICE and order.status == OPEN
    assert await redis.hget(keys.order(order.id), ORDER_FIELDS["stripe"]) == (
        f"{world.host}:0".encode()
    )
    assert await world.stripe(phone_id) == {
        "price_cents": PRICE,
        "gen": 0,
        "stock": 17,
        "sold": 3,
        "got": 20,
        "epoch": 0,
    }
    # The pool: only what the grant lent (LEND), nothing of the order.
    assert await world.pool(phone_id) == {"stock": 180, "held": 0, "sold": 0, "lent": 20}
    assert told == [StripeAnswer(world.host, phone_id, 17)]
    ledger_after = await redis.hgetall(keys.ledger(world.host))
    for name, moved in (("stripe_units", -3), ("stripe_sold_units", 3)):
        moved_by = int(ledger_after[name.encode()]) - int(ledger_before.get(name.encode(), 0))
        assert moved_by == moved
    balance = await redis.hget(keys.customer(world.customer_id), "balance_cents")
    assert int(balance) == 1_000_000 - 3 * PRICE

    # Nothing held, so at rest at once: every identity, and the stripe's sold units are
    # the open order's.
    audit = await shop.audit()
    assert audit["ok"] is True and audit["at_rest"] is True, audit["checks"]
    assert audit["stock"]["sold_units"] == 3 and audit["stock"]["stripe_units"] == 17


@ON_THE_CLUSTER
async def test_a_refused_stripe_order_writes_nothing_and_the_saga_places_that_id(
    shop: Shop, redis: Redis
) -> None:
    world = await _world(shop, redis, phones_wanted=2, units=4)
    first, second = world.phones
    scripts = world.scripts
    status_key = "k1"

    async def refused(
        lines: list[tuple[str, int]], short: list[str], closed: list[str] | None = None
    ) -> None:
        order_id = new_order_id(world.customer_id, 0)
        record, idempotency = idempotency_request(world.customer_id, lines, False, status_key, 600)
        names = world.every_key(order_id, [p for p, _ in lines], status_key)
        before = await world.dump(names)
        args: list = [order_id, world.customer_id, 1, "req", "0", *idempotency, world.host]
        for phone_id, quantity in lines:
            args += [phone_id, quantity]
        result = await stripes.place_from_stripe(
            scripts,
            stripes.place_from_stripe_keys(
                world.customer_id, order_id, OPEN, record, world.host, [p for p, _ in lines]
            ),
            args,
        )
        expected = {"code": "stripe_short", "phone_ids": short}
        if closed:
            expected["closed"] = closed
        assert (result.status, result.payload) == (409, expected)
        assert await world.dump(names) == before

    await refused([(first, 5)], [first])  # short: 4 in the stripe
    await refused([(first, 1), (second, 9)], [second])
    missing = partitions.new_id(partition_of(first))
    await refused([(missing, 1)], [missing])
    # Two stripes at different epochs (the order keeps one mark).
    await redis.hset(keys.stripe(world.host, second), "epoch", 1)
    await refused([(first, 1), (second, 1)], [second])
    await redis.hset(keys.stripe(world.host, second), "epoch", 0)
    # Closed (by a recall: written here by hand): said, so the order path stops trying
    # the phone's stripes until a receipt.
    await redis.hset(keys.stripe(world.host, first), "closed", 1)
    await refused([(first, 1), (second, 1)], [first], closed=[first])
    scripts.calls.clear()
    await _place(scripts, world.customer_id, [(first, 1)])
    assert [name for name, _ in scripts.calls][:2] == ["place_order", "place_from_stripe"]
    assert not STRIPE_HINTS.striped(first) and STRIPE_HINTS.striped(second)
    STRIPE_HINTS.learn(first, True)  # as a receipt would (and the stripe is open again)
    STRIPE_HINTS.refilled(world.host, first)
    await redis.hdel(keys.stripe(world.host, first), "closed")

    # Through the order path: the short stripe is refused, the saga places the same id
    # from the pool, and this worker stops trying that stripe for a while.
    told: list[StripeAnswer] = []
    stop = STRIPE_ANSWERS.listen(told.append)
    scripts.calls.clear()
    try:
        placed = await _place(scripts, world.customer_id, [(first, 6)])
    finally:
        stop()
    names = [name for name, _ in scripts.calls]
    assert names[:2] == ["place_order", "place_from_stripe"] and "commit_order" in names
    assert {order_id for _, order_id in scripts.calls} == {placed.order.id}
    assert told == [StripeAnswer(world.host, first, None)]
    assert await redis.hget(keys.order(placed.order.id), ORDER_FIELDS["stripe"]) is None
    assert (await world.stripe(first))["stock"] == 4
    assert await world.pool(first) == {"stock": 200 - 4 - 7, "held": 7, "sold": 0, "lent": 4}
    assert not STRIPE_HINTS.worth_trying(world.host, [first])
    scripts.calls.clear()
    await _place(scripts, world.customer_id, [(first, 1)])
    assert "place_from_stripe" not in [name for name, _ in scripts.calls]
    # A receipt refills it: tried again.
    assert (
        await grant(redis, scripts, phone_id=first, host=world.host, units=8, price_cents=PRICE)
    ).status == 200
    assert STRIPE_HINTS.worth_trying(world.host, [first, second])


@ON_THE_CLUSTER
async def test_an_idempotency_key_replayed_through_another_instance_gives_one_order(
    shop: Shop, redis: Redis, redis_cluster: LocalCluster
) -> None:
    world = await _world(shop, redis)
    (phone_id,) = world.phones
    settler = shop.client.app[appkeys.SETTLER]
    first = await _place(world.scripts, world.customer_id, [(phone_id, 2)], key="once")
    assert first.replayed is False

    other_gateway = open_cluster_gateway(
        "redis://127.0.0.1",
        tuple(("127.0.0.1", port) for port in redis_cluster.ports[:3]),
        replicas=1,
        wait_ms=2000,
        socket_timeout=5.0,
        max_connections=32,
    )
    try:
        other = RecordingScripts(other_gateway)
        # Another instance that learnt the stripe too: its stripe order finds the record.
        again = await _place(other, world.customer_id, [(phone_id, 2)], key="once")
        assert [name for name, _ in other.calls] == ["place_order", "place_from_stripe"]
        # One that never did (a worker started since): the saga, whose commit finds the
        # record; its reservation is released, never sold.
        STRIPE_HINTS.forget()
        other.calls.clear()
        by_saga = await _place(
            other, world.customer_id, [(phone_id, 2)], key="once", settle=settler.settle_soon
        )
        assert "commit_order" in [name for name, _ in other.calls]
    finally:
        await other_gateway.aclose()
    for answer in (again, by_saga):
        assert answer.replayed is True and answer.order.id == first.order.id
    await settled(redis)
    customer_orders = await redis.zcard(keys.customer_orders_by_status(world.customer_id, OPEN))
    assert customer_orders == 1
    assert await world.pool(phone_id) == {"stock": 180, "held": 0, "sold": 0, "lent": 20}
    assert (await world.stripe(phone_id))["sold"] == 2
    balance = await redis.hget(keys.customer(world.customer_id), "balance_cents")
    assert int(balance) == 1_000_000 - 2 * PRICE
    audit = await shop.audit_at_rest()
    assert audit["ok"] is True, audit["checks"]


@ON_THE_CLUSTER
async def test_commit_order_finding_a_stripe_order_answers_it_and_the_app_releases(
    shop: Shop, redis: Redis
) -> None:
    """The second guard (docs/escrow.md 3): a saga for an id already sold from a stripe
    (which the order path never starts) reserves, then its commit finds the order with
    its stripe mark; the app releases the reservation instead of selling it."""
    world = await _world(shop, redis)
    (phone_id,) = world.phones
    placed = await _place(world.scripts, world.customer_id, [(phone_id, 2)])
    order_id = placed.order.id
    expires = saga_service._now_ms() + 10_000
    reserved = await saga.reserve(
        world.scripts, order_id, partition_of(phone_id), [(phone_id, 2)], expires
    )
    assert reserved.status == 200
    assert (await world.pool(phone_id))["held"] == 2
    commit = await world.scripts.call(
        "commit_order",
        saga_service.commit_order_keys(world.customer_id, order_id, OPEN, None, 0),
        [
            order_id,
            world.customer_id,
            saga_service._now_ms(),
            "req",
            "0",
            "0",
            b"",
            0,
            reserved.payload["lines"],
            expires,
            saga.keep_until(),
            0,
        ],
    )
    assert commit.status == 201 and commit.payload["stripe"] == f"{world.host}:0"
    assert commit.payload["id"] == order_id


def _email_in(partitions_wanted: set[int]) -> str:
    for i in range(100_000):
        email = f"near{i}@example.com"
        if partitions.partition_for_email(email) in partitions_wanted:
            return email
    raise AssertionError("no email found")


@pytest.fixture
async def moved_world(tmp_path: Path) -> AsyncIterator[tuple[LocalCluster, World]]:
    """A cluster of the test's own (it reshards), the app's gateway on it, a customer on a
    primary whose host partition is not the customer's, a phone apart with a stripe."""
    cluster = new_cluster(tmp_path / "cluster")
    cluster.start()
    gateway = open_cluster_gateway(
        "redis://127.0.0.1",
        tuple(("127.0.0.1", port) for port in cluster.ports[:3]),
        replicas=1,
        wait_ms=2000,
        socket_timeout=5.0,
        max_connections=32,
    )
    raw = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in cluster.ports[:3]])
    try:
        scripts = RecordingScripts(gateway)
        await scripts.load()
        host = gateway.host_partitions()[1]
        served = {p for p in range(partitions.PARTITIONS) if gateway.host_partition(p) == host}
        customer, _ = await customers.create_customer(
            scripts,
            CustomerCreate(
                name="Ann", surname="Lee", email=_email_in(served - {host}), balance_cents=10**6
            ),
        )
        home = _node(gateway, host)
        phone_id = ""
        while not phone_id:
            phone = await phones.create_phone(
                scripts, PhoneCreate(name="p", price_cents=PRICE, stock=200)
            )
            if _node(gateway, partition_of(phone.id)) != home:
                phone_id = phone.id
        assert (
            await grant(raw, scripts, phone_id=phone_id, host=host, units=20, price_cents=PRICE)
        ).status == 200
        scripts.calls.clear()
        yield cluster, World(scripts, gateway, raw, customer.id, host, [phone_id])
    finally:
        await gateway.aclose()
        await raw.aclose()
        cluster.stop()


@pytest.mark.cluster
async def test_after_the_host_moved_the_order_goes_by_the_saga_with_the_same_id(
    moved_world: tuple[LocalCluster, World],
) -> None:
    cluster, world = moved_world
    (phone_id,) = world.phones
    view = cluster.topology()
    source = view.primary_for_slot(partitions.slot(world.host))
    target = next(p for p in view.primaries() if p.port != source.port)
    # The host partition (the lowest of its primary's: its 128 slots first) moves away;
    # the gateway's slot map still says it is with the customer's partition.
    await asyncio.to_thread(
        cluster.reshard, source.port, target.port, partitions.SLOTS_PER_PARTITION
    )
    assert world.gateway.host_partition(partition_of(world.customer_id)) == world.host

    placed = await _place(world.scripts, world.customer_id, [(phone_id, 2)])
    names = [name for name, _ in world.scripts.calls]
    assert names[:2] == ["place_order", "place_from_stripe"] and "commit_order" in names
    assert {order_id for _, order_id in world.scripts.calls} == {placed.order.id}
    assert await world.redis.hget(keys.order(placed.order.id), ORDER_FIELDS["stripe"]) is None
    # The stripe (now on another primary) is untouched; the pool holds the order's units.
    assert (await world.stripe(phone_id))["stock"] == 20
    assert (await world.pool(phone_id))["held"] == 2
    # The slot map learnt the move: the host is the next lowest partition there now.
    assert world.gateway.host_partition(partition_of(world.customer_id)) != world.host


async def test_one_redis_server_never_tries_a_stripe(redis: Redis) -> None:
    """No host partition there: even a phone hinted striped goes by place_order."""
    scripts = RecordingScripts(gateway_over(redis))
    phone = await phones.create_phone(scripts, PhoneCreate(name="p", price_cents=PRICE, stock=5))
    customer, _ = await customers.create_customer(
        scripts,
        CustomerCreate(name="Ann", surname="Lee", email="solo@example.com", balance_cents=10**6),
    )
    STRIPE_HINTS.learn(phone.id, True)
    scripts.calls.clear()
    await _place(scripts, customer.id, [(phone.id, 1)])
    assert [name for name, _ in scripts.calls] == ["place_order"]


@pytest.mark.cluster
async def test_a_lost_answer_sends_the_stripe_order_again_never_the_saga(
    moved_world: tuple[LocalCluster, World],
) -> None:
    """The customer's primary frozen (SIGSTOP) while the stripe order is on its way: its
    answer is lost (the socket times out, the gateway's own rerun too), so the order path
    sends it again; once the node thaws, the runs queued there place the order once and
    the later ones answer it. No reserve, no commit: never the saga after an unknown
    outcome (a reserve on the pool would take the units twice)."""
    cluster, world = moved_world
    (phone_id,) = world.phones
    impatient = open_cluster_gateway(
        "redis://127.0.0.1",
        tuple(("127.0.0.1", port) for port in cluster.ports[:3]),
        replicas=1,
        wait_ms=2000,
        socket_timeout=0.3,
        max_connections=32,
    )
    try:
        scripts = RecordingScripts(impatient)
        await scripts.load()
        primary = cluster.topology().primary_for_slot(
            partitions.slot(partition_of(world.customer_id))
        )
        sends = 0

        def stripe_sends() -> int:
            return sum(1 for name, _ in scripts.calls if name == "place_from_stripe")

        cluster.procs[primary.port].send_signal(signal.SIGSTOP)
        try:
            order = asyncio.create_task(_place(scripts, world.customer_id, [(phone_id, 2)]))
            # Thawed once the order path sent it a second time (the first answer lost).
            await wait_until_async(
                lambda: stripe_sends() >= 2, "a second send of the stripe order", 20.0
            )
        finally:
            cluster.procs[primary.port].send_signal(signal.SIGCONT)
        placed = await order
        sends = stripe_sends()
    finally:
        await impatient.aclose()
    names = {name for name, _ in scripts.calls}
    assert names == {"place_order", "place_from_stripe"} and sends >= 2
    assert {order_id for _, order_id in scripts.calls} == {placed.order.id}
    open_orders = await world.redis.zcard(keys.customer_orders_by_status(world.customer_id, OPEN))
    assert open_orders == 1
    assert (await world.stripe(phone_id))["sold"] == 2
    assert await world.pool(phone_id) == {"stock": 180, "held": 0, "sold": 0, "lent": 20}
    assert not await world.redis.hexists(keys.reservations(partition_of(phone_id)), placed.order.id)
    balance = await world.redis.hget(keys.customer(world.customer_id), "balance_cents")
    assert int(balance) == 10**6 - 2 * PRICE
