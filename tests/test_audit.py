"""The audit finishes while orders flow, says what it checked and as of when,
and catches rows changed outside the scripts, at rest and under load."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from app import appkeys, keys
from app.admin.audit import BATCH, LEDGER_CALLS, run_audit
from app.ops.redis_cluster import LocalCluster
from app.orders.service import place_order
from app.redis_gateway import gateway_over
from app.scripts import Scripts
from app.vocabulary import ORDER_FIELDS, new_order_id
from tests.helpers import ADMIN, CLUSTER, Shop, settled

PREFILL = 4 * BATCH  # enough rows that one audit takes several round trips
WRITES = 3000  # the writer's bound: it stops here even if no audit overlapped it


def check(audit: dict, name: str) -> dict:
    (found,) = [c for c in audit["checks"] if c["name"] == name]
    return found


async def _world(shop: Shop, redis: Redis) -> tuple[list[str], list[tuple[str, dict]]]:
    phones = [(await shop.phone(price_cents=100, stock=10**6))["id"] for _ in range(4)]
    customers = [await shop.customer(balance_cents=10**9) for _ in range(4)]
    scripts = Scripts(gateway_over(redis))
    counter = itertools.count()

    async def one() -> None:
        i = next(counter)
        customer_id = customers[i % 4][0]["id"]
        await place_order(
            scripts,
            order_id=new_order_id(customer_id, 0),
            customer_id=customer_id,
            lines=[(phones[i % 4], 1 + i % 3)],
            autocheck=i % 2 == 0,
            idempotency_key=None,
            idempotency_ttl=60,
            request_id="prefill",
        )

    for _ in range(PREFILL // 100):
        await asyncio.gather(*(one() for _ in range(100)))
    return phones, [(c["id"], auth) for c, auth in customers]


async def _writer(
    shop: Shop, phones: list[str], customers: list[tuple[str, dict]], stop: asyncio.Event
) -> int:
    """Orders placed, checked and cancelled through the API until told to stop."""
    for i in range(WRITES):
        if stop.is_set():
            return i
        _, auth = customers[i % len(customers)]
        placed = await shop.order(auth, [(phones[i % len(phones)], 1)], autocheck=i % 3 == 0)
        assert placed.status == 201, await placed.text()
        order_id = (await placed.json())["order"]["id"]
        if i % 3 == 1:
            assert (await shop.client.post(f"/orders/{order_id}/check", headers=auth)).status == 200
        elif i % 3 == 2:
            assert (
                await shop.client.post(f"/orders/{order_id}/cancel", headers=auth)
            ).status == 200
    return WRITES


async def _audit_under_load(shop: Shop, writer: asyncio.Task) -> dict:
    """Audit until one overlaps the writer's changes (bounded by the writer's WRITES)."""
    while not writer.done():
        audit = await shop.audit()
        if audit["writes_during"] > 0:
            return audit
    raise AssertionError(f"no audit overlapped the writer's {await writer} writes")


async def test_audit_finishes_and_holds_while_orders_are_placed(shop: Shop, redis: Redis) -> None:
    phones, customers = await _world(shop, redis)
    stop = asyncio.Event()
    writer = asyncio.create_task(_writer(shop, phones, customers, stop))
    try:
        audits = [await asyncio.wait_for(_audit_under_load(shop, writer), 120) for _ in range(2)]
    finally:
        stop.set()
        written = await writer
    for audit in audits:
        assert audit["ok"] is True, audit["checks"]
        assert audit["at_rest"] is False and audit["as_of"] is None
        assert check(audit, "ledger_balances_plus_orders_equal_added")["ok"] is True
        # Exact only at rest: bounded under load, or reported as not checked.
        assert check(audit, "recount_equals_ledger")["checked"].startswith("bounds")
        assert check(audit, "every_phone_stock_plus_sold_equals_added")["ok"] is None
        assert audit["orders"]["total"] >= PREFILL
    assert written < WRITES, "the writer finished before the audits overlapped it"

    # The split saga settles a 201's units up to 50 ms after the answer: rest
    # begins once that is done.
    await settled(redis)
    at_rest = await shop.audit()
    assert at_rest["ok"] is True and at_rest["at_rest"] is True
    assert at_rest["as_of"] == at_rest["finished_at"]
    assert {c["checked"] for c in at_rest["checks"] if c["holds"] == "at_rest"} == {"exact"}
    assert at_rest["orders"]["total"] == PREFILL + written
    ledger = at_rest["ledger"]["at_end"]
    assert ledger["orders_open"] + ledger["orders_completed"] + ledger["orders_cancelled"] == (
        PREFILL + written
    )
    assert at_rest["money"]["balances_cents"] == ledger["balance_cents"]


async def test_audit_under_load_catches_a_row_changed_outside_the_scripts(
    shop: Shop, redis: Redis
) -> None:
    phones, customers = await _world(shop, redis)
    # Units ever added only grow, so even under load the recount must stay
    # within the ledger's figures; a write no script made breaks that.
    await redis.hincrby(keys.phone(phones[0]), "added_units", 10**7)
    stop = asyncio.Event()
    writer = asyncio.create_task(_writer(shop, phones, customers, stop))
    try:
        audit = await asyncio.wait_for(_audit_under_load(shop, writer), 120)
    finally:
        stop.set()
        await writer
    assert audit["ok"] is False
    differing = check(audit, "recount_equals_ledger")["differing"]
    assert differing["added_units"]["recount"] > differing["added_units"]["ledger_at_end"]


async def test_audit_at_rest_catches_every_kind_of_tampering(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(price_cents=100, stock=10)
    customer, auth = await shop.customer(balance_cents=1000)
    order = (await (await shop.order(auth, [(phone["id"], 2)], autocheck=False)).json())["order"]
    await settled(redis)  # at rest: the saga's units of the order are sold, none held
    assert (await shop.audit())["ok"] is True

    await redis.hincrby(keys.customer(customer["id"]), "balance_cents", 1)
    audit = await shop.audit()
    assert audit["ok"] is False and audit["money"]["ok"] is False
    assert check(audit, "recount_equals_ledger")["differing"] == {
        "balance_cents": {"ledger": 800, "recount": 801}
    }
    await redis.hincrby(keys.customer(customer["id"]), "balance_cents", -1)

    await redis.hincrby(keys.phone(phone["id"]), "stock", -1)
    audit = await shop.audit()
    assert audit["ok"] is False and audit["stock"]["ok"] is False
    assert audit["stock"]["mismatches"] == [
        {"phone_id": phone["id"], "stock": 7, "sold": 2, "added": 10}
    ]
    await redis.hincrby(keys.phone(phone["id"]), "stock", 1)

    await redis.hset(keys.order(order["id"]), ORDER_FIELDS["total_cents"], 150)
    audit = await shop.audit()
    assert check(audit, "rows_consistent")["rows"] == [
        {"order_id": order["id"], "total": 150, "lines": 200}
    ]
    await redis.hset(keys.order(order["id"]), ORDER_FIELDS["total_cents"], 200)

    # The ledger itself: its identity holds at every moment, so this shows at once.
    await redis.hincrby(keys.ledger_of(customer["id"]), "open_cents", 5)
    audit = await shop.audit()
    assert check(audit, "ledger_balances_plus_orders_equal_added")["ok"] is False
    await redis.hincrby(keys.ledger_of(customer["id"]), "open_cents", -5)
    # A phone's partition: stock + sold = added.
    await redis.hincrby(keys.ledger_of(phone["id"]), "sold_units", 1)
    audit = await shop.audit()
    assert check(audit, "ledger_balances_plus_orders_equal_added")["ok"] is False
    await redis.hincrby(keys.ledger_of(phone["id"]), "sold_units", -1)
    assert (await shop.audit())["ok"] is True


async def _ledger(redis: Redis, key: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in (await redis.hgetall(key)).items()}


async def test_cancel_and_check_move_the_ledger(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(price_cents=100, stock=10)
    customer, auth = await shop.customer(balance_cents=1000)
    by_saga = shop.client.app[appkeys.SETTINGS].saga_always_split
    principal_orders = []
    for _ in range(2):
        placed = await shop.order(auth, [(phone["id"], 3)], autocheck=False)
        principal_orders.append((await placed.json())["order"]["id"])
        # Each order's saga settle on its own (not both in one batch): the count is exact.
        await settled(redis)
    # Through the API, so that the order path's form in use (collapsed or split) cancels.
    for action, order_id in (("check", principal_orders[0]), ("cancel", principal_orders[1])):
        response = await shop.client.post(f"/orders/{order_id}/{action}", headers=ADMIN)
        assert response.status == 200, await response.text()
    customer_side = {
        "customers": 1,
        "orders_open": 0,
        "orders_completed": 1,
        "orders_cancelled": 1,
        "balance_cents": 700,
        "added_cents": 1000,
        "open_cents": 0,
        "completed_cents": 300,
        "open_units": 0,
        "completed_units": 3,
    }
    # The phone's units sold are the completed order's.
    phone_side = {"phones": 1, "stock_units": 7, "added_units": 10, "sold_units": 3}
    # The phone's moves: create, 2 orders, cancel; under the saga each order is a reserve
    # and a settle, and every step is a script of its own partition.
    phone_moves = 6 if by_saga else 4
    if by_saga:
        phone_side["held_units"] = 0
    customer_ledger = await _ledger(redis, keys.ledger_of(customer["id"]))
    phone_ledger = await _ledger(redis, keys.ledger_of(phone["id"]))
    if keys.ledger_of(customer["id"]) == keys.ledger_of(phone["id"]):  # 1 time in 128
        # One partition: place_order's 2 orders and its cancel move it once each.
        shared_moves = 0 if by_saga else 3
        assert customer_ledger == {
            **customer_side,
            **phone_side,
            "changes": 5 + phone_moves - shared_moves,
        }
    else:
        # create, 2 orders, check (customer side only), cancel: 5 moves of the customer's
        # partition.
        assert customer_ledger == {**customer_side, "changes": 5}
        assert phone_ledger == {**phone_side, "changes": phone_moves}


@pytest.mark.cluster
@pytest.mark.parametrize("stack_kind", [CLUSTER], indirect=True)
async def test_a_fresh_cluster_client_audits_with_a_bounded_count_of_connections(
    redis: Redis, redis_cluster: LocalCluster
) -> None:
    """The audit's 128 ledger reads on a cluster go LEDGER_CALLS at a time: a fresh client
    opens no more connections to a primary than that (all at once, redis-py once failed
    one of them mid-connect)."""
    fresh = RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", port) for port in redis_cluster.ports[:3]]
    )
    try:
        await fresh.initialize()
        assert (await run_audit(fresh))["ok"] is True
        opened = [len(node._connections) for node in fresh.get_primaries()]
    finally:
        await fresh.aclose()
    # Each primary serves about a third of the partitions, so it was sent some of them.
    assert all(0 < count <= LEDGER_CALLS for count in opened), opened
