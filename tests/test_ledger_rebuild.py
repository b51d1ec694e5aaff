"""A database written before the ledger existed: the audit names the missing
ledger and the fix, and app/admin/ledger_rebuild.py rebuilds it at rest."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from redis.asyncio import Redis

from app import keys
from app.admin.audit import BATCH, LEDGER_FIELDS
from app.admin.ledger_rebuild import LedgerRebuildError, recount_ledger, write_ledger
from app.partitions import PARTITIONS
from app.vocabulary import OPEN
from tests.helpers import ADMIN, Shop, settled


def check(audit: dict, name: str) -> dict:
    (found,) = [c for c in audit["checks"] if c["name"] == name]
    return found


async def _ledgers(redis: Redis) -> dict[int, dict[str, int]]:
    """Every partition's ledger that exists."""
    found = {}
    for p in range(PARTITIONS):
        ledger = {f.decode(): int(v) for f, v in (await redis.hgetall(keys.ledger(p))).items()}
        if ledger:
            found[p] = ledger
    return found


async def _delete_ledgers(redis: Redis) -> None:
    await redis.delete(*[keys.ledger(p) for p in range(PARTITIONS)])


async def _fill(shop: Shop, redis: Redis) -> None:
    """Rows of every kind the ledger sums: phones (one restocked), customers (one
    deposit), open, completed and cancelled orders; more rows than one BATCH."""
    phones = [await shop.phone(price_cents=100 + i, stock=1000) for i in range(3)]
    customers = [await shop.customer(balance_cents=10**6) for _ in range(4)]
    restock = await shop.client.post(
        f"/phones/{phones[0]['id']}/restock", json={"quantity": 7}, headers=ADMIN
    )
    assert restock.status == 200
    deposit = await shop.client.post(
        f"/customers/{customers[0][0]['id']}/deposit", json={"amount_cents": 555}, headers=ADMIN
    )
    assert deposit.status == 200

    async def one(i: int) -> None:
        _, auth = customers[i % 4]
        placed = await shop.order(auth, [(phones[i % 3]["id"], 1 + i % 2)], autocheck=False)
        assert placed.status == 201, await placed.text()
        order_id = (await placed.json())["order"]["id"]
        if i % 3 != 2:
            action = "check" if i % 3 == 0 else "cancel"
            answer = await shop.client.post(f"/orders/{order_id}/{action}", headers=auth)
            assert answer.status == 200

    for start in range(0, BATCH + 30, 10):
        await asyncio.gather(*(one(i) for i in range(start, start + 10)))
    # At rest: under the split saga a 201's units are settled after the answer.
    await settled(redis)


def _run_rebuild(redis: Redis) -> subprocess.CompletedProcess:
    """The operator's command, as a separate process on this test's Redis."""
    kwargs = redis.connection_pool.connection_kwargs
    env = {**os.environ, "REDIS_URL": f"redis://{kwargs['host']}:{kwargs['port']}/0"}
    return subprocess.run(
        [sys.executable, "-m", "app.admin.ledger_rebuild"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_missing_ledger_is_named_and_the_rebuild_makes_the_audit_exact_again(
    shop: Shop, redis: Redis
) -> None:
    empty = await shop.audit()  # no rows, no ledger yet: nothing is missing
    assert empty["ok"] and check(empty, "ledger_present")["ok"] is True
    await _fill(shop, redis)
    kept = await _ledgers(redis)
    assert (await shop.audit())["ok"]

    await _delete_ledgers(redis)  # as a database from before the ledger
    audit = await shop.audit()
    assert audit["ok"] is False
    assert audit["at_rest"] is True
    missing = check(audit, "ledger_present")
    assert missing["ok"] is False
    assert "ledger missing" in missing["detail"]
    assert "python -m app.admin.ledger_rebuild" in missing["detail"]
    assert audit["ledger"]["present"] is False and audit["ledger"]["missing"] == missing["detail"]
    # Said once, not as every figure differing; the checks that need no ledger still run.
    for name in ("ledger_balances_plus_orders_equal_added", "recount_equals_ledger"):
        assert check(audit, name)["ok"] is None
        assert check(audit, name)["checked"] == "not checked: ledger missing"
    assert check(audit, "recount_equals_ledger")["differing"] == {}
    for name in (
        "no_negative_stock_or_balance",
        "rows_consistent",
        "no_dangling_index_entries",
        "every_phone_stock_plus_sold_equals_added",
        "recount_balances_plus_orders_equal_added",
    ):
        assert check(audit, name)["ok"] is True, name

    result = await asyncio.to_thread(_run_rebuild, redis)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["rebuilt"] is True
    rebuilt = await _ledgers(redis)
    assert set(rebuilt) == set(kept) and answer["partitions"] == len(kept)
    for p, ledger in rebuilt.items():
        assert set(ledger) == set(LEDGER_FIELDS)
        # Every figure as the scripts had kept it (a figure the scripts never
        # moved is written as 0); `changes` counts the rebuild alone.
        assert {f: v for f, v in ledger.items() if f != "changes"} == {
            f: kept[p].get(f, 0) for f in LEDGER_FIELDS if f != "changes"
        }
        assert ledger["changes"] == 1
    assert answer["ledger"]["changes"] == len(kept)
    audit = await shop.audit()
    assert audit["ok"] is True and audit["at_rest"] is True
    assert check(audit, "ledger_present")["ok"] is True
    assert check(audit, "recount_equals_ledger") == {
        "name": "recount_equals_ledger",
        "holds": "at_rest",
        "checked": "exact",
        "ok": True,
        "differing": {},
    }
    assert audit["orders"]["total"] == BATCH + 30

    # The scripts carry on from the rebuilt ledger.
    phone = await shop.phone(price_cents=300, stock=2)
    _, auth = await shop.customer(balance_cents=1000)
    assert (await shop.order(auth, [(phone["id"], 2)])).status == 201
    assert (await shop.audit())["ok"] is True


async def test_the_rebuild_writes_nothing_when_a_script_ran_during_its_recount(
    shop: Shop, redis: Redis
) -> None:
    await _fill(shop, redis)
    await _delete_ledgers(redis)
    recount = await recount_ledger(redis)
    assert set(recount.changes.values()) == {0}
    # A write between the recount and its writing: the new phone moves a
    # ledger the recount does not include.
    await shop.phone(price_cents=300, stock=2)
    partial = await _ledgers(redis)
    assert [ledger["changes"] for ledger in partial.values()] == [1]
    with pytest.raises(LedgerRebuildError, match="1 script run"):
        await write_ledger(redis, recount)
    assert await _ledgers(redis) == partial
    assert (await shop.audit())["ok"] is False

    # At rest, the same command succeeds and counts the new phone too.
    result = await asyncio.to_thread(_run_rebuild, redis)
    assert result.returncode == 0, result.stderr
    audit = await shop.audit()
    assert audit["ok"] is True and audit["stock"]["phones"] == 4
    stock_units = sum(ledger["stock_units"] for ledger in (await _ledgers(redis)).values())
    assert stock_units == 3 * 1000 + 7 + 2 - audit["stock"]["sold_units"]


async def test_rows_the_ledger_cannot_sum_stop_the_rebuild(shop: Shop, redis: Redis) -> None:
    await _fill(shop, redis)
    await _delete_ledgers(redis)
    # A status chunk entry of partition 0 whose order is not there (the walk reads
    # chunks its directory names, up to the partition's clock).
    await redis.zadd(keys.order_chunks(0, OPEN), {"0": 1}, nx=True)
    await redis.zadd(keys.orders_by_status(0, OPEN, 0), {"no-such-order": 1})
    await redis.set(keys.orders_seq(0), keys.order_clock(10**9, 0, 1), nx=True)
    before = {key: await redis.dump(key) for key in await redis.keys("*")}
    result = await asyncio.to_thread(_run_rebuild, redis)
    assert result.returncode == 1
    assert "no-such-order" in result.stderr
    assert {key: await redis.dump(key) for key in await redis.keys("*")} == before
