"""Escrow's recall (docs/escrow.md, section 5) script by script, on one redis-server and on
the real 3+3 cluster with the phone's partition and its two stripe hosts on three
different primaries: drain_phone, close_stripe and receive_shipments, each idempotent (a
second run answers the same and moves nothing), the fence of grants in flight, and the
units of every place at rest: the pool's stock + held + sold + lent = added, lent back to
0, the stripes closed and empty.

Stripes are made by the real grant (reserve_grant, receive_grant, settle_reservation:
tests/escrow_staging.py); the phone's mode striped and a stripe's sales are staged there,
TEST-ONLY, until the striping rule and the stripe order are on main."""

from __future__ import annotations

from app import keys, partitions
from app.fields import STOCK_LIMIT
from app.ops.poll import wait_until_async
from app.orders import grants, recall, stripes
from app.orders import saga as steps
from app.orders.settler import Settler
from tests import escrow_staging as staging
from tests.saga_fixtures import (
    ORDER_PARTITION,
    OTHER_PHONE_PARTITION,
    PHONE_PARTITION,
    SagaWorld,
)

HOST_A, HOST_B = ORDER_PARTITION, OTHER_PHONE_PARTITION
LATER_MS = 10**13


async def pool(saga: SagaWorld, phone_id: str) -> dict[str, int]:
    row = await saga.redis.hmget(
        keys.phone(phone_id), "stock", "held", "sold", "lent", "added_units"
    )
    return dict(
        zip(("stock", "held", "sold", "lent", "added"), (int(v or 0) for v in row), strict=True)
    )


async def stripe(saga: SagaWorld, host: int, phone_id: str) -> dict[str, str]:
    return await saga.redis.hgetall(keys.stripe(host, phone_id))


async def restock(saga: SagaWorld, phone_id: str, quantity: int) -> None:
    """restock.lua (the saga world's phones are bare hashes, which the API's restock would
    not answer as a Phone)."""
    result = await saga.scripts.run(
        "restock", [keys.phone(phone_id), keys.ledger_of(phone_id)], [quantity, STOCK_LIMIT]
    )
    assert result.status == 200, result.payload


async def test_a_recall_brings_every_stripe_home_once(saga: SagaWorld) -> None:
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=20)
    await staging.grant(saga.scripts, saga.redis, phone, HOST_A, 5)
    await staging.grant(saga.scripts, saga.redis, phone, HOST_B, 3)
    await staging.sell_from_stripe(saga.redis, HOST_A, phone, 2)
    assert await pool(saga, phone) == {"stock": 12, "held": 0, "sold": 0, "lent": 8, "added": 20}

    done = await recall.recall(saga.scripts, phone)
    assert done.done and done.stock == 18 and done.lent == 0
    assert sorted(done.received) == sorted([f"{phone}:{HOST_A}:0", f"{phone}:{HOST_B}:0"])
    assert await pool(saga, phone) == {"stock": 18, "held": 0, "sold": 2, "lent": 0, "added": 20}
    assert "mode" not in await saga.redis.hgetall(keys.phone(phone))
    assert await saga.redis.scard(keys.stripe_hosts(phone)) == 0
    assert await saga.redis.zscore(keys.drains_due(PHONE_PARTITION), phone) is None
    closed = await stripe(saga, HOST_A, phone)
    assert {k: closed[k] for k in ("stock", "sold", "got", "epoch", "closed")} == {
        "stock": "0",
        "sold": "0",
        "got": "0",
        "epoch": "1",
        "closed": "1",
    }
    assert await saga.redis.hget(keys.shipments(HOST_A), f"{phone}:{HOST_A}:0") == f"{phone}:3:2:0"
    # Received, so off the host's list of shipments due (that list is for a dead app's).
    assert await saga.redis.zscore(keys.shipments_due(HOST_A), f"{phone}:{HOST_A}:0") is None

    # Each step again, as a retried call or a second recall would: the same answers,
    # nothing moves twice.
    again = await recall.close_stripe(saga.scripts, HOST_A, phone, [], LATER_MS)
    assert again == {
        "outcomes": {},
        "shipment_id": f"{phone}:{HOST_A}:0",
        "shipment": f"{phone}:3:2:0",
    }
    received = await recall.receive_shipments(
        saga.scripts, phone, [], [(HOST_A, again["shipment_id"], again["shipment"])], recalls=0
    )
    assert received["received"] == {} and received["lent"] == "0"
    second = await recall.recall(saga.scripts, phone)
    assert second.done and second.received == []
    assert await pool(saga, phone) == {"stock": 18, "held": 0, "sold": 2, "lent": 0, "added": 20}


async def test_a_recall_fences_the_grants_in_flight(saga: SagaWorld) -> None:
    """A grant not received by its host is aborted there (its receipt would be refused)
    and its held units go back to the pool's stock; one received is settled held -> lent
    and comes home with its stripe's shipment."""
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=30)
    lost = await staging.grant(
        saga.scripts, saga.redis, phone, HOST_A, 4, received=False, settled=False
    )
    landed = await staging.grant(saga.scripts, saga.redis, phone, HOST_B, 6, settled=False)
    assert await pool(saga, phone) == {"stock": 20, "held": 10, "sold": 0, "lent": 0, "added": 30}

    done = await recall.recall(saga.scripts, phone)
    assert done.done and done.settled == 2
    assert done.received == [f"{phone}:{HOST_B}:0"]  # the stripe on A never existed
    assert await pool(saga, phone) == {"stock": 30, "held": 0, "sold": 0, "lent": 0, "added": 30}
    assert await saga.redis.hget(keys.aborts(HOST_A), lost) == "swept"
    assert not await saga.redis.hexists(keys.aborts(HOST_B), landed)
    assert await saga.redis.hget(keys.releases(PHONE_PARTITION), lost) == "released"
    assert await saga.redis.hmget(keys.reservations(PHONE_PARTITION), lost, landed) == [None, None]
    assert await saga.redis.scard(keys.grants_in_flight(phone)) == 0
    # The lost grant's receipt, arriving late, is refused: its units are in the pool.
    late = await stripes.receive_grant(
        saga.scripts, host=HOST_A, phone_id=phone, grant_id=lost, units=4, price_cents=100, gen=0
    )
    assert late.status == 503
    assert not await saga.redis.exists(keys.stripe(HOST_A, phone))
    # The fence again: the same outcomes, one marker.
    again = await recall.close_stripe(saga.scripts, HOST_A, phone, [lost], LATER_MS)
    assert again == {"outcomes": ["aborted"]}
    again = await recall.close_stripe(saga.scripts, HOST_B, phone, [landed], LATER_MS)
    assert again["outcomes"] == ["received"]


async def test_drain_with_nothing_lent_writes_nothing(saga: SagaWorld) -> None:
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=3)
    before = await saga.gateway.execute("DUMP", keys.phone(phone))
    assert await recall.drain(saga.scripts, phone, LATER_MS) == recall.Drained({})
    assert await saga.gateway.execute("DUMP", keys.phone(phone)) == before
    assert await saga.redis.zscore(keys.drains_due(PHONE_PARTITION), phone) is None


async def test_drain_marks_the_phone_and_lists_it_for_the_settler(saga: SagaWorld) -> None:
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=10)
    await staging.grant(saga.scripts, saga.redis, phone, HOST_A, 4)
    grant = await staging.grant(
        saga.scripts, saga.redis, phone, HOST_B, 2, received=False, settled=False
    )
    drained = await recall.drain(saga.scripts, phone, 1234)
    assert drained == recall.Drained({HOST_A: [], HOST_B: [grant]}, lent=4, recalls=0)
    assert await saga.redis.hget(keys.phone(phone), "mode") == "draining"
    assert await saga.redis.zscore(keys.drains_due(PHONE_PARTITION), phone) == 1234
    # A second drain keeps the first due time (the settler's grace runs from the first).
    await recall.drain(saga.scripts, phone, 9999)
    assert await saga.redis.zscore(keys.drains_due(PHONE_PARTITION), phone) == 1234


async def test_a_receipt_that_does_not_add_up_writes_nothing(saga: SagaWorld) -> None:
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=10)
    await staging.grant(saga.scripts, saga.redis, phone, HOST_A, 2)
    before = await saga.gateway.execute("DUMP", keys.phone(phone))
    # More units home than the pool lent: a broken invariant, refused whole.
    result = await saga.scripts.call(
        "receive_shipments",
        [
            keys.phone(phone),
            keys.stripe_hosts(phone),
            keys.grants_in_flight(phone),
            keys.taken_back(PHONE_PARTITION),
            keys.reservations(PHONE_PARTITION),
            keys.reservations_due(PHONE_PARTITION),
            keys.releases(PHONE_PARTITION),
            keys.releases_due(PHONE_PARTITION),
            keys.ledger(PHONE_PARTITION),
            keys.drains_due(PHONE_PARTITION),
        ],
        [phone, LATER_MS, 0, 0, HOST_A, f"{phone}:{HOST_A}:0", f"{phone}:2:1:0"],
    )
    assert (result.status, result.payload["code"]) == (409, "lent_short")
    assert await saga.gateway.execute("DUMP", keys.phone(phone)) == before
    assert not await saga.redis.sismember(keys.taken_back(PHONE_PARTITION), f"{phone}:{HOST_A}:0")


async def test_a_stale_receipt_leaves_a_stripe_granted_again_on_its_host(saga: SagaWorld) -> None:
    """Two recalls of one phone, the second's receipt last: recall R2 drains and closes the
    stripe on A; recall R1 does the same and ends (A off the stripe hosts, the phone pool
    only); a restock and a new grant stripe A again (its receipt opens the closed stripe).
    R2's receipt then names A as closed, but its drain read fewer ended recalls than the
    phone has: it may not take A off the hosts, or the new grant's units would be lent with
    no host to recall them from (a race test on the cluster met that: "units lent and no
    stripe host or grant"). The next recall brings them home."""
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=40)
    await staging.grant(saga.scripts, saga.redis, phone, HOST_A, 5)
    stale = await recall.drain(saga.scripts, phone, LATER_MS)
    assert stale == recall.Drained({HOST_A: []}, lent=5, recalls=0)
    closed = await recall.close_stripe(saga.scripts, HOST_A, phone, [], LATER_MS)

    first = await recall.recall(saga.scripts, phone)
    assert first.done and first.received == [f"{phone}:{HOST_A}:0"]
    assert await saga.redis.hmget(keys.phone(phone), "recalls", "drained") == ["1", "1"]
    await restock(saga, phone, 10)
    await staging.grant(saga.scripts, saga.redis, phone, HOST_A, 7)
    assert (await stripe(saga, HOST_A, phone))["stock"] == "7"
    assert await pool(saga, phone) == {"stock": 43, "held": 0, "sold": 0, "lent": 7, "added": 50}

    late = await recall.receive_shipments(
        saga.scripts,
        phone,
        [],
        [(HOST_A, closed["shipment_id"], closed["shipment"])],
        recalls=stale.recalls,
    )
    assert late["stale"] is True and late["received"] == {} and late["mode"] == "striped"
    assert await saga.redis.smembers(keys.stripe_hosts(phone)) == {str(HOST_A)}
    assert await pool(saga, phone) == {"stock": 43, "held": 0, "sold": 0, "lent": 7, "added": 50}

    second = await recall.recall(saga.scripts, phone)
    assert second.done and second.received == [f"{phone}:{HOST_A}:1"]
    assert await pool(saga, phone) == {"stock": 50, "held": 0, "sold": 0, "lent": 0, "added": 50}
    assert await saga.redis.scard(keys.stripe_hosts(phone)) == 0


async def test_a_drained_phone_is_not_striped_again_until_a_restock(saga: SagaWorld) -> None:
    """No ping-pong (docs/escrow.md, section 5): the units a recall brought home are the
    pool's tail, sold by the saga; the striping rule stripes the phone again only once a
    restock has made it deep anew. (HOT_RESERVES in a row may straddle a horizon of the
    rule, so twice as many are sent.)"""
    phone = await saga.phone(PHONE_PARTITION, price_cents=100, stock=1000)
    await staging.grant(saga.scripts, saga.redis, phone, HOST_A, 8)
    assert (await recall.recall(saga.scripts, phone)).done

    async def striped_by(reserves: int) -> bool:
        for _ in range(reserves):
            order = partitions.new_id(partitions.PARTITIONS - 1)
            result = await steps.reserve(
                saga.scripts,
                order,
                PHONE_PARTITION,
                [(phone, 1)],
                LATER_MS,
                striping_rule=grants.STRIPING_RULE,
            )
            assert result.status == 200, result.payload
            if result.payload.get("striped") == [phone]:
                return True
        return False

    assert not await striped_by(2 * grants.HOT_RESERVES)
    assert "mode" not in await saga.redis.hgetall(keys.phone(phone))
    await restock(saga, phone, 100)
    assert not await saga.redis.hexists(keys.phone(phone), "drained")
    assert await striped_by(2 * grants.HOT_RESERVES)

    # A restock while a recall is under way counts too: that recall's end leaves the
    # phone unmarked (the restock made it deep after the drain).
    await staging.grant(saga.scripts, saga.redis, phone, HOST_A, 8)
    drained = await recall.drain(saga.scripts, phone, LATER_MS)
    await restock(saga, phone, 100)
    assert await saga.redis.hget(keys.phone(phone), "restocked") == "1"
    closed = await recall.close_stripe(saga.scripts, HOST_A, phone, [], LATER_MS)
    ended = await recall.receive_shipments(
        saga.scripts,
        phone,
        [],
        [(HOST_A, closed["shipment_id"], closed["shipment"])],
        recalls=drained.recalls,
    )
    assert ended["mode"] == "" and ended["lent"] == "0"
    row = await saga.redis.hgetall(keys.phone(phone))
    assert "drained" not in row and "restocked" not in row and row["recalls"] == "2"
    assert await striped_by(2 * grants.HOT_RESERVES)


async def test_the_settler_finishes_a_recall_a_dead_app_left(saga: SagaWorld) -> None:
    """docs/escrow.md 8's rows for the recall: an app died after draining the phone (no
    close sent), another after closing one host (its shipment due, not received). One
    sweep past their grace recalls both (on a cluster: on one redis-server no stripe is
    ever granted, so the settler does not look for recalls there)."""
    drained = await saga.phone(PHONE_PARTITION, price_cents=100, stock=10)
    await staging.grant(saga.scripts, saga.redis, drained, HOST_A, 6)
    await recall.drain(saga.scripts, drained, 1)  # due long ago
    shipped = await saga.phone(PHONE_PARTITION, price_cents=100, stock=10)
    await staging.grant(saga.scripts, saga.redis, shipped, HOST_B, 5)
    await recall.drain(saga.scripts, shipped, LATER_MS)  # only its shipment is due
    closed = await recall.close_stripe(saga.scripts, HOST_B, shipped, [], 1)
    assert closed["shipment"] == f"{shipped}:5:0:0"

    settler = Settler(saga.gateway, saga.scripts)
    if saga.backend == "single":
        await settler.sweep()
        assert await pool(saga, drained) == {
            "stock": 4,
            "held": 0,
            "sold": 0,
            "lent": 6,
            "added": 10,
        }
        return

    async def recalled() -> bool:
        # Swept again until done: another test's settler may still hold a partition's
        # lease for a few seconds (LEASE_MS).
        await settler.sweep()
        rows = [await pool(saga, phone) for phone in (drained, shipped)]
        return all(row["lent"] == 0 for row in rows)

    await wait_until_async(recalled, "the settler to finish both recalls", 30)
    for phone in (drained, shipped):
        assert await pool(saga, phone) == {
            "stock": 10,
            "held": 0,
            "sold": 0,
            "lent": 0,
            "added": 10,
        }
        assert "mode" not in await saga.redis.hgetall(keys.phone(phone))
        assert await saga.redis.zscore(keys.drains_due(PHONE_PARTITION), phone) is None
    assert await saga.redis.zscore(keys.shipments_due(HOST_B), f"{shipped}:{HOST_B}:0") is None
    left = await stripe(saga, HOST_A, drained)
    assert (left["closed"], left["stock"], left["epoch"]) == ("1", "0", "1")


async def test_the_settler_recalls_stripes_left_off_the_host_partitions(saga: SagaWorld) -> None:
    """A stripe on a partition that is no host partition (as a reshard leaves one: no
    order reaches it) is recalled by the settler's periodic look, with every other stripe
    of its phone; a phone striped on host partitions only is left alone. On one
    redis-server there is no host partition and nothing is looked at."""
    if saga.backend == "single":
        assert await Settler(saga.gateway, saga.scripts).recall_foreign_stripes() == []
        return
    await saga.gateway.execute("PING")  # the gateway's slot map, for its host partitions
    hosts = saga.gateway.host_partitions()
    assert HOST_B not in hosts  # 60: its primary's lowest partition is lower
    host = next(
        h for h in hosts if saga.node_of(keys.ledger(h)) != saga.node_of(keys.ledger(HOST_B))
    )
    stranded = await saga.phone(PHONE_PARTITION, price_cents=100, stock=10)
    at_home = await saga.phone(PHONE_PARTITION, price_cents=100, stock=10)
    for phone in (stranded, at_home):
        # TEST-ONLY: the saga world seeds phone hashes alone; the settler reads the
        # partition's phone list, which create_phone.lua writes.
        await saga.redis.zadd(keys.phones(PHONE_PARTITION), {phone: 1})
        await staging.grant(saga.scripts, saga.redis, phone, host, 3)
    await staging.grant(saga.scripts, saga.redis, stranded, HOST_B, 4)

    recalled = await Settler(saga.gateway, saga.scripts).recall_foreign_stripes()
    assert stranded in recalled and at_home not in recalled
    assert await pool(saga, stranded) == {"stock": 10, "held": 0, "sold": 0, "lent": 0, "added": 10}
    assert await pool(saga, at_home) == {"stock": 7, "held": 0, "sold": 0, "lent": 3, "added": 10}
    for where in (host, HOST_B):
        assert (await stripe(saga, where, stranded))["closed"] == "1"
    assert "closed" not in await stripe(saga, host, at_home)
