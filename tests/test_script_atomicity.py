"""Every script error path leaves every key byte-for-byte unchanged.

Redis never rolls back a half-run script, so each script validates before its
first write; DUMP of the whole database before and after each refused call
proves it (the database holds only this test's keys).

An order the split reservation saga refuses (on one redis-server only with the test-only
SAGA_ALWAYS_SPLIT=1: it collapses into one script there) is several scripts: its reserves
may have held units, given back before the answer, and the refusal is written down so
that no late step of that order can act (docs/data-tier.md 3.1). "Changes nothing" is
then: money, stock, orders, indexes, events and every ledger total byte-for-byte as
before, and the only differences are that bookkeeping, named in
``_unexplained_by_a_saga_refusal``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis

from app import appkeys, keys
from app.main import create_app
from app.orders.service import cancel_order_keys, check_order_keys
from app.partitions import PARTITIONS, chunk_of, partition_of
from app.problems import ProblemError
from app.redis_gateway import gateway_over
from app.scripts import Scripts
from app.vocabulary import ORDER_FIELDS
from tests.helpers import ADMIN, Shop, settled, snapshot

Hashes = dict[bytes, dict[bytes, bytes]]


@dataclass(frozen=True)
class Before:
    """The database before a refused call: every key's DUMP, and every hash read field by
    field so that a saga refusal's bookkeeping can be told apart, field by field."""

    dumps: dict[bytes, bytes]
    hashes: Hashes


async def _fields(redis: Redis, key: bytes) -> dict[bytes, bytes] | None:
    """A hash's fields, or a sorted set's members with their scores; None for another type."""
    kind = await redis.type(key)
    if kind == b"hash":
        return await redis.hgetall(key)
    if kind == b"zset":
        return {
            m: repr(score).encode() for m, score in await redis.zrange(key, 0, -1, withscores=True)
        }
    return None


async def before_a_refusal(redis: Redis) -> Before:
    # Earlier answers' settles (up to 50 ms after a saga 201) are not the refusal's.
    await settled(redis)
    dumps = await snapshot(redis)
    fields = {key: await _fields(redis, key) for key in dumps}
    return Before(dumps, {key: value for key, value in fields.items() if value is not None})


def _in_every_partition(key_of: Callable[[int], str]) -> dict[bytes, int]:
    return {key_of(partition).encode(): partition for partition in range(PARTITIONS)}


ABORTS = _in_every_partition(keys.aborts)
RELEASES = _in_every_partition(keys.releases)
ABORTS_DUE = _in_every_partition(keys.aborts_due)
RELEASES_DUE = _in_every_partition(keys.releases_due)
LEDGERS = _in_every_partition(keys.ledger)


# A phone's apart reserves counted by the striping rule (reserve_stock.lua).
STRIPING_COUNTS = frozenset({b"apart", b"apart_at"})


def _but_counts(fields: dict[bytes, bytes]) -> dict[bytes, bytes]:
    return {field: value for field, value in fields.items() if field not in STRIPING_COUNTS}


def _unexplained_by_a_saga_refusal(before: Hashes, now: Hashes) -> dict[bytes, object]:
    """The changed keys (``now``: their hashes after the refusal) a saga refusal does not
    explain; empty when every difference is the refusal's own bookkeeping:
    - one abort marker: exactly one new field, the refused order's id, in one ``ab{P}``;
    - release tombstones: that order id -> "released" in the ``rx{Q}`` of each phone
      partition where it had reserved (and only there);
    - the pruning lists beside them: that order id in the marker's ``ad{P}`` and in the
      ``xd{Q}`` of each of those phone partitions (and nowhere else);
    - on exactly those partitions the reserve and its release, two counted writes: the
      ledger's ``changes`` grows by 2, ``held_units`` may appear at 0, every other
      ledger field unchanged; a reserved phone's ``held`` may appear at 0;
    - with escrow's striping rule on (the default), a reserved phone's count of apart
      reserves in this horizon (``apart``, ``apart_at``: reserve_stock.lua): demand, a
      hint for striping, not stock; the refusal does not take it back.
    Anything else (a field changed or gone, another key, another count) is unexplained."""
    unexplained: dict[bytes, object] = {}
    markers: list[bytes] = []
    marker_partitions: set[int] = set()
    tombstones: dict[int, dict[bytes, bytes]] = {}
    due: dict[bytes, set[bytes]] = {}
    moved_ledgers: set[int] = set()
    for key, fields in now.items():
        old = before.get(key, {})
        added = {field: value for field, value in fields.items() if field not in old}
        kept = all(fields.get(field) == value for field, value in old.items())
        if key in ABORTS and kept:
            markers.extend(added)
            marker_partitions.add(ABORTS[key])
        elif (key in ABORTS_DUE or key in RELEASES_DUE) and kept:
            due[key] = set(added)
        elif key in RELEASES and kept:
            tombstones[RELEASES[key]] = added
        elif key in LEDGERS:
            rest = {f: v for f, v in fields.items() if f not in (b"changes", b"held_units")}
            old_rest = {f: v for f, v in old.items() if f not in (b"changes", b"held_units")}
            grown = int(fields.get(b"changes", 0)) - int(old.get(b"changes", 0))
            if (
                rest != old_rest
                or grown != 2
                or fields.get(b"held_units") != old.get(b"held_units", b"0")
            ):
                unexplained[key] = (old, fields)
            moved_ledgers.add(LEDGERS[key])
        elif b"price_cents" in old and _but_counts({**old, b"held": old.get(b"held", b"0")}) == (
            _but_counts(fields)
        ):
            continue  # a phone whose held counter was created at 0 by the reserve
        else:
            unexplained[key] = (old, fields)
    if len(markers) != 1:
        unexplained[b"abort markers"] = markers
        return unexplained
    for partition, added in tombstones.items():
        if added != {markers[0]: b"released"}:
            unexplained[b"tombstones of partition %d" % partition] = added
    expected_due = {keys.aborts_due(p).encode(): {markers[0]} for p in marker_partitions}
    expected_due |= {keys.releases_due(p).encode(): {markers[0]} for p in tombstones}
    if due != expected_due:
        unexplained[b"pruning lists"] = due
    if moved_ledgers != set(tombstones):
        unexplained[b"ledgers moved without a release"] = sorted(moved_ledgers - set(tombstones))
    return unexplained


async def assert_changed_nothing(
    redis: Redis, before: Before, *, saga_refusal: bool = False, what: str = ""
) -> None:
    """Byte-for-byte unchanged; with ``saga_refusal`` (an order refused by the saga) every
    difference must be that refusal's bookkeeping, and it must be there."""
    after = await snapshot(redis)
    if not saga_refusal:
        assert after == before.dumps, what
        return
    changed = [k for k in before.dumps.keys() | after.keys() if before.dumps.get(k) != after.get(k)]
    now = {key: await _fields(redis, key) for key in changed}
    assert None not in now.values(), (what, now)
    assert _unexplained_by_a_saga_refusal(before.hashes, now) == {}, what


def by_saga(shop: Shop) -> bool:
    """Whether the app under test places orders by the split reservation saga."""
    return shop.client.app[appkeys.SETTINGS].saga_always_split


@pytest.fixture
async def world(shop: Shop) -> dict:
    phone = await shop.phone(price_cents=1000, stock=2)
    customer, auth = await shop.customer(balance_cents=5000)
    open_order = await shop.order(auth, [(phone["id"], 1)], autocheck=False)
    completed_order = await shop.order(auth, [(phone["id"], 1)])
    return {
        "phone": phone,
        "customer": customer,
        "auth": auth,
        "open": (await open_order.json())["order"],
        "completed": (await completed_order.json())["order"],
    }


async def test_http_error_paths_change_nothing(shop: Shop, redis: Redis, world: dict) -> None:
    # world: one open and one completed order; then one cancelled, stock 1 left.
    phone, customer, auth = world["phone"], world["customer"], world["auth"]
    await shop.client.post(f"/phones/{phone['id']}/restock", json={"quantity": 1}, headers=ADMIN)
    cancelled = (await (await shop.order(auth, [(phone["id"], 1)], autocheck=False)).json())[
        "order"
    ]
    await shop.client.post(f"/orders/{cancelled['id']}/cancel", headers=auth)
    missing = "AAAAAAAAAAAAAAAAAAAAAA"
    refused_calls = [
        ("POST", "/orders", {"items": [{"phone_id": missing, "quantity": 1}]}, auth, 404),
        ("POST", "/orders", {"items": [{"phone_id": phone["id"], "quantity": 2}]}, auth, 409),
        (
            "POST",
            "/orders",
            {"items": [{"phone_id": phone["id"], "quantity": 1}], "customer_id": missing},
            ADMIN,
            404,
        ),
        ("POST", f"/orders/{cancelled['id']}/check", None, auth, 409),
        ("POST", f"/orders/{world['completed']['id']}/cancel", None, auth, 409),
        ("POST", f"/orders/{missing}/check", None, ADMIN, 404),
        ("POST", f"/orders/{missing}/cancel", None, ADMIN, 404),
        ("POST", f"/phones/{missing}/restock", {"quantity": 1}, ADMIN, 404),
        ("PATCH", f"/phones/{missing}", {"name": "x"}, ADMIN, 404),
        ("POST", f"/customers/{missing}/deposit", {"amount_cents": 1}, ADMIN, 404),
        (
            "POST",
            "/customers",
            {"name": "A", "surname": "B", "email": customer["email"].upper()},
            ADMIN,
            409,
        ),
    ]
    for method, path, body, headers, status in refused_calls:
        before = await before_a_refusal(redis)
        response = await shop.client.request(method, path, json=body, headers=headers)
        assert response.status == status, (path, await response.text())
        an_order = by_saga(shop) and path == "/orders"
        await assert_changed_nothing(redis, before, saga_refusal=an_order, what=path)


async def test_insufficient_funds_changes_nothing(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(price_cents=1000, stock=5)
    _, auth = await shop.customer(balance_cents=999)
    before = await before_a_refusal(redis)
    response = await shop.order(auth, [(phone["id"], 1)])
    assert response.status == 402
    await assert_changed_nothing(redis, before, saga_refusal=by_saga(shop))


async def test_limit_rejections_change_nothing(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(stock=10**9)
    customer, _ = await shop.customer(balance_cents=10**12)
    scripts = Scripts(gateway_over(redis))
    before = await before_a_refusal(redis)
    with pytest.raises(ProblemError) as stock:
        await scripts.run(
            "restock", [keys.phone(phone["id"]), keys.ledger_of(phone["id"])], [1, 10**9]
        )
    assert stock.value.code == "stock_limit"
    with pytest.raises(ProblemError) as balance:
        await scripts.run(
            "deposit", [keys.customer(customer["id"]), keys.ledger_of(customer["id"])], [1, 10**12]
        )
    assert balance.value.code == "balance_limit"
    await assert_changed_nothing(redis, before)


async def test_idempotency_mismatch_changes_nothing(shop: Shop, redis: Redis) -> None:
    phone = await shop.phone(price_cents=10, stock=5)
    _, auth = await shop.customer()
    headers = {**auth, "Idempotency-Key": "abc"}
    first = await shop.client.post(
        "/orders", json={"items": [{"phone_id": phone["id"], "quantity": 1}]}, headers=headers
    )
    assert first.status == 201
    before = await before_a_refusal(redis)
    other = await shop.client.post(
        "/orders", json={"items": [{"phone_id": phone["id"], "quantity": 3}]}, headers=headers
    )
    assert other.status == 422
    await assert_changed_nothing(redis, before, saga_refusal=by_saga(shop))


async def test_scripts_refuse_keys_that_do_not_fit_the_order(shop: Shop, redis: Redis) -> None:
    """check/cancel are given keys built from a read of the order; if those keys
    name another owner or other items, or leave some out, the script refuses before
    writing."""
    phone = await shop.phone(price_cents=10, stock=5)
    owner, auth = await shop.customer()
    other, _ = await shop.customer()
    order = (await (await shop.order(auth, [(phone["id"], 1)], autocheck=False)).json())["order"]
    scripts = Scripts(gateway_over(redis))
    chunk = chunk_of(order["id"])
    before = await before_a_refusal(redis)
    with pytest.raises(ProblemError) as wrong_owner:
        await scripts.run(
            "check_order",
            check_order_keys(order["id"], other["id"], chunk),
            [other["id"], "", 0, "req", chunk],
        )
    assert wrong_owner.value.code == "order_owner_changed"
    items = (await redis.hget(keys.order(order["id"]), ORDER_FIELDS["items"])).decode()
    limits = [10**15, 10**12]
    with pytest.raises(ProblemError) as wrong_owner:
        await scripts.run(
            "cancel_order",
            cancel_order_keys(order["id"], other["id"], items, chunk),
            [other["id"], "", 0, "req", items, *limits, chunk],
        )
    assert wrong_owner.value.code == "order_owner_changed"
    other_items = f"{phone['id']}:5:10"
    with pytest.raises(ProblemError) as wrong_items:
        await scripts.run(
            "cancel_order",
            cancel_order_keys(order["id"], owner["id"], other_items, chunk),
            [owner["id"], "", 0, "req", other_items, *limits, chunk],
        )
    assert wrong_items.value.code == "order_owner_changed"
    # The right items, but the reservations' key left out.
    with pytest.raises(ProblemError) as keys_left_out:
        await scripts.run(
            "cancel_order",
            cancel_order_keys(order["id"], owner["id"], items, chunk)[:-1],
            [owner["id"], "", 0, "req", items, *limits, chunk],
        )
    assert keys_left_out.value.code == "order_owner_changed"
    await assert_changed_nothing(redis, before)


async def test_a_saga_refusal_is_allowed_its_bookkeeping_and_nothing_more(
    aiohttp_client: Any, app_env: dict[str, str], redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The allowance above is exact: it accepts what a saga refusal writes, and one write
    more (a unit, a cent, a ledger count) is caught."""
    monkeypatch.setenv("SAGA_ALWAYS_SPLIT", "1")
    shop = Shop(await aiohttp_client(await create_app()))
    phone = await shop.phone(price_cents=1000, stock=5)
    customer, auth = await shop.customer(balance_cents=999)
    before = await before_a_refusal(redis)
    assert (await shop.order(auth, [(phone["id"], 1)])).status == 402
    await assert_changed_nothing(redis, before, saga_refusal=True)
    # The bookkeeping is there: byte for byte, the refusal did write.
    with pytest.raises(AssertionError):
        await assert_changed_nothing(redis, before)
    for key, field in (
        (keys.phone(phone["id"]), "stock"),
        (keys.phone(phone["id"]), "held"),
        (keys.customer(customer["id"]), "balance_cents"),
        (keys.ledger_of(phone["id"]), "changes"),
        (keys.ledger_of(phone["id"]), "stock_units"),
    ):
        await redis.hincrby(key, field, 1)
        with pytest.raises(AssertionError):
            await assert_changed_nothing(redis, before, saga_refusal=True)
        await redis.hincrby(key, field, -1)
    # A second marker is another order's, not this refusal's.
    await redis.hset(keys.aborts(partition_of(customer["id"])), "another-order", "402 {}")
    with pytest.raises(AssertionError):
        await assert_changed_nothing(redis, before, saga_refusal=True)
