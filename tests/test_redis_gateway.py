"""app/redis_gateway.py: one interface over either transport, chosen at start-up,
with every call timed inside it (the multiplexed fast path included)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, Redis

from app import appkeys, keys
from app.fastredis import MultiplexedRedis
from app.partitions import PARTITIONS, new_id
from app.redis_gateway import (
    ClientTransport,
    LuaScript,
    RedisGateway,
    TimedRedis,
    gateway_over,
    open_gateway,
)
from loadtests.support.round_trips import CountingTransport
from loadtests.support.servers import RedisServer
from tests.helpers import Shop, timed


@pytest.fixture
async def gateways(redis: Redis, redis_server: RedisServer) -> AsyncIterator[list[RedisGateway]]:
    """The same server through each transport."""
    pool = BlockingConnectionPool.from_url(redis_server.url)
    fast = MultiplexedRedis.for_pool(pool, timeout=2.0)
    assert fast is not None
    both = [RedisGateway(fast), gateway_over(redis)]
    yield both
    for gateway in both:
        await gateway.aclose()
    await pool.aclose()


async def test_both_transports_answer_alike(gateways: list[RedisGateway], redis: Redis) -> None:
    await redis.hset("h", mapping={"a": "1", "b": "2"})
    await redis.set("s", "x")
    await redis.zadd("z", {"m1": 1, "m2": 2})
    answers = []
    for gateway in gateways:
        answers.append(
            (
                await gateway.get("s"),
                await gateway.get("missing"),
                await gateway.hgetall("h"),
                await gateway.hgetall("missing"),
                await gateway.hmget("h", ["b", "nope", "a"]),
                await gateway.execute_many([("ZCARD", "z"), ("ZREVRANGE", "z", 0, -1)]),
                await gateway.hgetall_many(["h", "missing"]),
            )
        )
    assert answers[0] == answers[1]
    assert answers[0] == (
        b"x",
        None,
        {"a": "1", "b": "2"},
        {},
        [b"2", None, b"1"],
        [2, [b"m2", b"m1"]],
        [{"a": "1", "b": "2"}, {}],
    )
    for gateway in gateways:
        with pytest.raises(rx.ResponseError, match="WRONGTYPE"):
            await gateway.hgetall("s")


async def test_scripts_run_and_reload_after_noscript_on_both(
    gateways: list[RedisGateway], redis: Redis
) -> None:
    script = LuaScript.of("count", "return redis.call('INCRBY', KEYS[1], ARGV[1])")
    totals = []
    for gateway in gateways:
        await redis.script_flush()
        assert await gateway.execute("SCRIPT", "EXISTS", script.sha) == [0]
        before = timed("script:count")
        # NOSCRIPT, SCRIPT LOAD, EVALSHA: it ran once, and counts as one call.
        totals.append(await gateway.run_script(script, ["n"], [2]))
        assert timed("script:count") - before == 1
        assert await gateway.execute("SCRIPT", "EXISTS", script.sha) == [1]
    assert totals == [2, 4]


async def test_the_fast_path_is_timed_by_command(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the gateway, the list pages and reads over the multiplexed
    connection were never timed; now every call is, by what it sends."""
    app = shop.client.app
    assert isinstance(app[appkeys.REDIS_GATEWAY].transport, MultiplexedRedis)
    sweeps = 0
    # The settler's sweep (one PIPELINE of probes a second, nothing due here) and its
    # pruning (the same, every 30 s) may land in the window: counted, so that the figure
    # below stays exact.
    settler = app[appkeys.SETTLER]

    def counted(run: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def counted_run(*args: int) -> Any:
            nonlocal sweeps
            # Counted once done, in the same step as its PIPELINE's timing (nothing due:
            # the probe is its last await).
            done = await run(*args)
            sweeps += 1
            return done

        return counted_run

    monkeypatch.setattr(settler, "sweep", counted(settler.sweep))
    monkeypatch.setattr(settler, "prune", counted(settler.prune))
    # The order's one answering script: place_order (the saga collapsed on one node), or
    # the split saga's commit after its reserve (test-only SAGA_ALWAYS_SPLIT).
    split = app[appkeys.SETTINGS].saga_always_split
    order_scripts = (
        ("script:reserve_stock", "script:commit_order") if split else ("script:place_order",)
    )
    phone = await shop.phone()
    _, auth = await shop.customer()
    before = {call: timed(call) for call in ("PIPELINE", "HGETALL", "GET", *order_scripts)}
    sweeps = 0

    # The clocks, the merge (ZCARD+ZRANGE), the rows; then remembered: clocks and rows.
    assert (await shop.client.get("/phones")).status == 200
    assert (await shop.client.get("/phones")).status == 200
    assert (await shop.client.get(f"/phones/{phone['id']}")).status == 200
    assert (await shop.order(auth, [(phone["id"], 1)])).status == 201  # token GET + script
    assert (await shop.order(auth, [(phone["id"], 1)])).status == 201  # token now cached

    after = {call: timed(call) for call in before}
    assert {call: after[call] - before[call] for call in before} == {
        "PIPELINE": 3 + 1 + sweeps,
        "HGETALL": 1,
        "GET": 1,
        **dict.fromkeys(order_scripts, 2),
    }


async def test_the_client_for_the_rest_is_timed_the_same_way(
    redis: Redis, redis_server: RedisServer
) -> None:
    client = TimedRedis.from_url(redis_server.url)
    try:
        before = {call: timed(call) for call in ("XLEN", "PIPELINE", "EVALSHA")}
        await client.xlen(keys.events(0))
        async with client.pipeline(transaction=False) as pipe:
            pipe.xlen(keys.events(0)).xlen(keys.events(1))
            assert await pipe.execute() == [0, 0]
        # Scripts are timed by name in the gateway; here they stay untimed.
        await client.register_script("return 1")()
        after = {call: timed(call) for call in before}
    finally:
        await client.aclose()
    assert {call: after[call] - before[call] for call in before} == {
        "XLEN": 1,
        "PIPELINE": 1,
        "EVALSHA": 0,
    }


async def test_the_transport_is_chosen_once_from_the_url() -> None:
    plain = BlockingConnectionPool.from_url("redis://127.0.0.1:1/0")
    tls = BlockingConnectionPool.from_url("rediss://127.0.0.1:1/0")
    for pool, transport in ((plain, MultiplexedRedis), (tls, ClientTransport)):
        gateway = open_gateway(pool, timeout=1.0)
        assert isinstance(gateway.transport, transport)
        await gateway.aclose()
        await pool.aclose()


async def test_string_keys_of_every_partition_and_commands_are_one_round_trip(
    redis: Redis,
) -> None:
    """read_strings_with (what the catalogue's page check reads its 128 clocks by,
    app/phones/page_cache.py): on one redis-server one MGET beside the commands."""
    clocks = [keys.phones_seq(p) for p in range(PARTITIONS)]
    await redis.mset({clocks[p]: str(p) for p in range(0, PARTITIONS, 3)})
    phone = keys.phone(new_id(5))
    await redis.hset(phone, "name", "x")
    transport = CountingTransport(redis)
    values, replies = await RedisGateway(transport).read_strings_with(
        clocks, [("HGET", phone, "name"), ("HGET", phone, "stock")]
    )
    assert values == [str(p).encode() if p % 3 == 0 else None for p in range(PARTITIONS)]
    assert replies == [b"x", None]
    assert transport.round_trips == 1
