"""Escrow, build-step 1 (docs/escrow.md, sections 4 and 8): a grant's receipt on its stripe
host (app/lua/receive_grant.lua), the host partition of a primary (the gateway's
host_partition), and the audit's identities with stripes, on one redis-server and on the
3+3 cluster. The stripes are made by the real receipt; the pool side of each grant is
written by tests/stripe_fixtures.py's test-only LEND (no app script does it yet)."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app import appkeys, keys, partitions
from app.admin.audit import run_audit
from app.admin.ledger_rebuild import rebuild_ledger
from app.orders import stripes
from app.partitions import partition_of
from app.redis_gateway import RedisGateway
from tests.helpers import ON_BOTH_STACKS, Placement, Shop
from tests.saga_fixtures import ORDER_PARTITION, SagaWorld
from tests.stripe_fixtures import grant


async def _host(world: SagaWorld) -> int:
    """A stripe host: the customer partition's primary's on the cluster; on one
    redis-server (which never uses one) any partition does for the script itself."""
    await world.scripts.load()  # the gateway's first call learns the slot map
    host = world.gateway.host_partition(ORDER_PARTITION)
    return ORDER_PARTITION if host is None else host


def _host_keys(host: int, phone_id: str) -> list[str]:
    return stripes.receive_grant_keys(host, phone_id)


async def _snapshot(world: SagaWorld, host: int, phone_id: str) -> dict[str, bytes | None]:
    return {key: await world.redis.dump(key) for key in _host_keys(host, phone_id)}


async def _stripe(world: SagaWorld, host: int, phone_id: str) -> dict[str, str]:
    return await world.redis.hgetall(keys.stripe(host, phone_id))


async def _receive(world: SagaWorld, host: int, phone_id: str, grant_id: str, **how: int):
    args = {"units": 16, "price_cents": 500, "gen": 0, **how}
    return await stripes.receive_grant(
        world.scripts, host=host, phone_id=phone_id, grant_id=grant_id, **args
    )


async def _ledger(world: SagaWorld, partition: int) -> dict[str, int]:
    stored = await world.redis.hgetall(keys.ledger(partition))
    return {name: int(value) for name, value in stored.items()}


async def test_a_receipt_adds_the_grant_to_the_stripe_once(saga: SagaWorld) -> None:
    host, phone_id = await _host(saga), partitions.new_id(5)
    grant_id = partitions.new_id(host)
    before = await _ledger(saga, host)

    first = await _receive(saga, host, phone_id, grant_id)
    assert (first.status, first.flag) == (200, True)
    assert first.payload == {"stock": "16", "got": "16", "price_cents": "500", "gen": "0"}
    assert await _stripe(saga, host, phone_id) == {
        "price_cents": "500",
        "gen": "0",
        "stock": "16",
        "sold": "0",
        "got": "16",
        "epoch": "0",
    }
    assert await saga.redis.hget(keys.grant_receipts(host), grant_id) == "16"
    assert await saga.redis.zscore(keys.grant_receipts_due(host), grant_id) is not None
    after = await _ledger(saga, host)
    moved = {name: after[name] - before.get(name, 0) for name in after}
    assert {name: value for name, value in moved.items() if value} == {
        "stripe_units": 16,
        "received_units": 16,
        "changes": 1,
    }

    # Again (a retry after a lost answer, the gateway's rerun): answered, nothing written.
    snapshot = await _snapshot(saga, host, phone_id)
    again = await _receive(saga, host, phone_id, grant_id)
    assert (again.status, again.flag) == (200, False)
    assert again.payload == first.payload
    assert await _snapshot(saga, host, phone_id) == snapshot

    # Another grant adds to the same stripe.
    other = await _receive(saga, host, phone_id, partitions.new_id(host), units=8)
    assert (other.status, other.flag, other.payload["stock"]) == (200, True, "24")


async def test_a_fenced_grant_is_refused_and_nothing_is_written(saga: SagaWorld) -> None:
    """The settler's fence aborted the grant (its marker in ab{S}, as an order's): the
    receipt never takes it, a new stripe is not even made, and a retry says the same."""
    host, phone_id = await _host(saga), partitions.new_id(5)
    fenced = partitions.new_id(host)
    await saga.redis.hset(keys.aborts(host), fenced, "swept")
    snapshot = await _snapshot(saga, host, phone_id)
    for _ in range(2):
        refused = await _receive(saga, host, phone_id, fenced)
        assert (refused.status, refused.payload, refused.flag) == (
            503,
            {"code": "service_unavailable"},
            False,
        )
        assert await _snapshot(saga, host, phone_id) == snapshot
    assert await _stripe(saga, host, phone_id) == {}

    # A grant received before its fence came (the fence finds the receipt and does not
    # mark it; a marker written anyway does not undo the receipt's answer).
    received = partitions.new_id(host)
    assert (await _receive(saga, host, phone_id, received)).status == 200
    await saga.redis.hset(keys.aborts(host), received, "swept")
    assert (await _receive(saga, host, phone_id, received)).status == 503


async def test_the_newest_generations_price_wins(saga: SagaWorld) -> None:
    host, phone_id = await _host(saga), partitions.new_id(60)

    async def receive(gen: int, price_cents: int) -> dict[str, str]:
        answer = await _receive(
            saga, host, phone_id, partitions.new_id(host), units=4, price_cents=price_cents, gen=gen
        )
        assert answer.status == 200
        return answer.payload

    assert await receive(2, 300) == {"stock": "4", "got": "4", "price_cents": "300", "gen": "2"}
    # A late grant of an older price: its units are taken, the newer price stays.
    assert await receive(1, 200) == {"stock": "8", "got": "8", "price_cents": "300", "gen": "2"}
    # The same generation (a grant after the same price change): its price, the same one.
    assert await receive(2, 300) == {"stock": "12", "got": "12", "price_cents": "300", "gen": "2"}
    assert await receive(3, 100) == {"stock": "16", "got": "16", "price_cents": "100", "gen": "3"}


async def test_a_receipt_opens_a_closed_stripe_at_its_epoch(saga: SagaWorld) -> None:
    """A stripe closed by a recall (written here by hand as close_stripe, build-step 4,
    will leave it: closed, epoch one more, its figures shipped home)."""
    host, phone_id = await _host(saga), partitions.new_id(5)
    stripe = keys.stripe(host, phone_id)
    await saga.redis.hset(
        stripe,
        mapping={
            "price_cents": 500,
            "gen": 0,
            "stock": 0,
            "sold": 0,
            "got": 0,
            "epoch": 3,
            "closed": 1,
        },
    )
    answer = await _receive(saga, host, phone_id, partitions.new_id(host), units=8)
    assert (answer.status, answer.payload["stock"]) == (200, "8")
    row = await _stripe(saga, host, phone_id)
    assert "closed" not in row and row["epoch"] == "3" and row["got"] == "8"


async def test_bad_arguments_are_refused_before_any_write(saga: SagaWorld) -> None:
    host, phone_id = await _host(saga), partitions.new_id(5)
    snapshot = await _snapshot(saga, host, phone_id)
    for how in ({"units": 0}, {"units": -3}, {"price_cents": -1}, {"gen": -1}):
        with pytest.raises(ResponseError, match="receive_grant: bad"):
            await _receive(saga, host, phone_id, partitions.new_id(host), **how)
    assert await _snapshot(saga, host, phone_id) == snapshot
    # A grant id is minted in its host partition (the fence looks for it there).
    with pytest.raises(ValueError, match="not minted in host partition"):
        await _receive(saga, host, phone_id, partitions.new_id((host + 1) % 128))


async def test_the_host_partition_is_the_lowest_partition_of_the_same_primary(
    saga: SagaWorld,
) -> None:
    gateway = saga.gateway
    await saga.scripts.load()  # the gateway's first call learns the slot map
    if saga.backend == "single":
        # One redis-server: no other primary, no stripe is ever used.
        assert type(gateway) is RedisGateway
        assert gateway.host_partition(ORDER_PARTITION) is None
        assert gateway.host_partitions() == []
        return
    served_by: dict[str, list[int]] = {}
    for p in range(partitions.PARTITIONS):
        served_by.setdefault(saga.node_of(keys.ledger(p)), []).append(p)
    assert len(served_by) == 3
    for served in served_by.values():
        for p in served:
            assert gateway.host_partition(p) == min(served)
    assert gateway.host_partitions() == sorted(min(served) for served in served_by.values())
    assert gateway.host_partitions()[0] == 0


def _stack_host(shop: Shop, phone_id: str, other_than: set[int]) -> int:
    """A host partition on another primary than the phone's (on the cluster), else any
    other partition (one redis-server: the script and the audit do not care)."""
    gateway = shop.client.app[appkeys.REDIS_GATEWAY]
    hosts = [h for h in gateway.host_partitions() if h not in other_than]
    if hosts:
        mine = gateway.host_partition(partition_of(phone_id))
        return next(h for h in hosts if h != mine)
    return next(p for p in range(1, 128) if p not in other_than | {partition_of(phone_id)})


def _check(audit: dict, name: str) -> dict:
    (found,) = [c for c in audit["checks"] if c["name"] == name]
    return found


@ON_BOTH_STACKS
async def test_the_audit_holds_with_stripes_and_catches_their_tampering(
    shop: Shop, redis: Redis, placement: Placement
) -> None:
    scripts = shop.client.app[appkeys.SCRIPTS]
    phone = await shop.phone(price_cents=500, stock=100)
    phone_id = phone["id"]
    first = _stack_host(shop, phone_id, set())
    second = _stack_host(shop, phone_id, {first})
    for host, units in ((first, 16), (second, 8)):
        received = await grant(
            redis, scripts, phone_id=phone_id, host=host, units=units, price_cents=500
        )
        assert received.status == 200
    audit = await shop.audit()
    assert audit["ok"] is True and audit["at_rest"] is True, audit["checks"]
    assert audit["stock"]["lent_units"] == 24 and audit["stock"]["stripe_units"] == 24
    assert audit["ledger"]["at_end"]["received_units"] == 24

    stripe = keys.stripe(first, phone_id)
    # A stripe's own identity (stock + sold = got), at every moment.
    await redis.hincrby(stripe, "stock", 1)
    audit = await shop.audit()
    assert audit["ok"] is False
    assert {"stripe": stripe, "stock": 17, "sold": 0, "got": 16} in _check(
        audit, "rows_consistent"
    )["rows"]
    assert _check(audit, "recount_equals_ledger")["differing"] == {
        "stripe_units": {"ledger": 24, "recount": 25}
    }
    await redis.hincrby(stripe, "stock", -1)

    # The host ledger's identity (stripe + stripe sold = received), at every moment.
    await redis.hincrby(keys.ledger(first), "received_units", 1)
    audit = await shop.audit()
    assert _check(audit, "ledger_balances_plus_orders_equal_added")["ok"] is False
    await redis.hincrby(keys.ledger(first), "received_units", -1)

    # The phone's: stock + held + sold + lent = added at every moment; lent = its stripes'
    # got at rest.
    await redis.hincrby(keys.phone(phone_id), "lent", -1)
    audit = await shop.audit()
    assert audit["ok"] is False and audit["stock"]["ok"] is False
    assert {
        "phone_id": phone_id,
        "stock": 76,
        "held": 0,
        "sold": 0,
        "lent": 23,
        "added": 100,
    } in _check(audit, "rows_consistent")["rows"]
    assert audit["stock"]["mismatches"] == [
        {
            "phone_id": phone_id,
            "stock": 76,
            "sold": 0,
            "added": 100,
            "lent": 23,
            "stripe_stock": 24,
            "stripe_got": 24,
            "stripe_sold": 0,
            "stripe_sold_in_orders": 0,
        }
    ]
    await redis.hincrby(keys.phone(phone_id), "lent", 1)

    # A shipment due (a closed stripe's units on their way home): not at rest.
    await redis.zadd(keys.shipments_due(second), {f"{second}:0": 1})
    audit = await shop.audit()
    assert audit["ok"] is True and audit["at_rest"] is False
    assert "shipments due" in _check(audit, "every_phone_stock_plus_sold_equals_added")["checked"]
    await redis.zrem(keys.shipments_due(second), f"{second}:0")
    assert (await shop.audit())["at_rest"] is True


async def test_the_ledger_rebuild_recounts_the_stripe_figures(shop: Shop, redis: Redis) -> None:
    scripts = shop.client.app[appkeys.SCRIPTS]
    phone_id = (await shop.phone(price_cents=500, stock=100))["id"]
    host = _stack_host(shop, phone_id, set())
    assert (
        await grant(redis, scripts, phone_id=phone_id, host=host, units=16, price_cents=500)
    ).status == 200
    fields = ("stock_units", "lent_units", "stripe_units", "stripe_sold_units", "received_units")
    ledgers = [keys.ledger(partition_of(phone_id)), keys.ledger(host)]
    before = [await redis.hmget(ledger, *fields) for ledger in ledgers]
    await redis.delete(*ledgers)
    assert (await rebuild_ledger(redis))["rebuilt"] is True
    after = [await redis.hmget(ledger, *fields) for ledger in ledgers]
    assert [[int(v or 0) for v in row] for row in after] == [
        [int(v or 0) for v in row] for row in before
    ]
    assert [int(v or 0) for v in after[0]][:2] == [84, 16]
    assert [int(v or 0) for v in after[1]][2:] == [16, 0, 16]
    assert (await run_audit(redis))["ok"] is True
