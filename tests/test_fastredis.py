"""app/fastredis.py against a real redis-server: replies, redis-py's error classes,
order under concurrency, lost connections, timeouts, and the scripts' NOSCRIPT path."""

from __future__ import annotations

import asyncio

import pytest
from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, Redis

from app.fastredis import MultiplexedRedis
from app.scripts import Scripts
from tests.servers import RedisServer


@pytest.fixture
async def fast(redis: Redis, redis_server: RedisServer):
    pool = BlockingConnectionPool.from_url(redis_server.url)
    client = MultiplexedRedis.for_pool(pool, timeout=2.0)
    assert client is not None
    yield client
    await client.aclose()
    await pool.aclose()


async def test_replies_are_what_redis_py_gets(fast: MultiplexedRedis, redis: Redis) -> None:
    await redis.hset("h", mapping={"a": "1", "b": "2"})
    assert await fast.execute("PING") == b"PONG"
    assert await fast.execute("INCRBY", "n", 5) == 5
    assert await fast.execute("GET", "missing") is None
    assert sorted(await fast.execute("HGETALL", "h")) == sorted([b"a", b"1", b"b", b"2"])
    assert await fast.execute("EVAL", "return {1, 'x', {2}}", 0) == [1, b"x", [2]]


async def test_errors_are_redis_py_exceptions(fast: MultiplexedRedis, redis: Redis) -> None:
    await redis.set("s", "x")
    with pytest.raises(rx.ResponseError, match="WRONGTYPE"):
        await fast.execute("HGET", "s", "f")
    with pytest.raises(rx.NoScriptError):
        await fast.execute("EVALSHA", "0" * 40, 0)
    # The connection is still usable after an error reply.
    assert await fast.execute("GET", "s") == b"x"


async def test_concurrent_commands_get_their_own_replies(fast: MultiplexedRedis) -> None:
    replies = await asyncio.gather(*(fast.execute("INCR", "counter") for _ in range(300)))
    assert sorted(replies) == list(range(1, 301))
    echoes = await asyncio.gather(*(fast.execute("ECHO", str(i)) for i in range(300)))
    assert echoes == [str(i).encode() for i in range(300)]


async def test_a_late_reply_is_dropped_and_order_kept(redis_server: RedisServer) -> None:
    pool = BlockingConnectionPool.from_url(redis_server.url)
    client = MultiplexedRedis.for_pool(pool, timeout=0.2)
    try:
        with pytest.raises(rx.TimeoutError):
            await client.execute("BLPOP", "nothing-here", "0.6")
        # The next command waits behind the blocked one, then gets its own reply.
        client._timeout = 5.0
        assert await client.execute("ECHO", "after") == b"after"
    finally:
        await client.aclose()
        await pool.aclose()


async def test_a_lost_connection_fails_in_flight_and_reconnects(
    fast: MultiplexedRedis, redis: Redis
) -> None:
    await fast.execute("CLIENT", "SETNAME", "fast-under-test")
    blocked = asyncio.ensure_future(fast.execute("BLPOP", "nothing-here", "5"))
    await asyncio.sleep(0.1)
    await redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    with pytest.raises(rx.ConnectionError):
        await blocked
    assert await fast.execute("PING") == b"PONG"  # a new connection


async def test_nothing_listening_is_a_connection_error() -> None:
    client = MultiplexedRedis(host="127.0.0.1", port=1, timeout=1.0)
    with pytest.raises(rx.ConnectionError):
        await client.execute("PING")
    await client.aclose()


async def test_scripts_reload_after_a_script_flush(fast: MultiplexedRedis, redis: Redis) -> None:
    scripts = Scripts(redis, fast)
    await redis.script_flush()
    # create_phone through the multiplexed connection: NOSCRIPT, SCRIPT LOAD, EVALSHA.
    result = await scripts.run(
        "create_phone",
        ["phone:AAAAAAAAAAAAAAAAAAAAAA", "phones", "phones:seq"],
        ["AAAAAAAAAAAAAAAAAAAAAA", "P", "", "", 100, 3, 1],
    )
    assert result.status == 201
    assert result.payload["stock"] == "3"
    assert await redis.hget("phone:AAAAAAAAAAAAAAAAAAAAAA", "stock") == b"3"


async def test_execute_many_answers_in_order_and_raises_the_error(
    fast: MultiplexedRedis, redis: Redis
) -> None:
    await redis.set("s", "x")
    assert await fast.execute_many([("ECHO", "a"), ("INCR", "m"), ("ECHO", "b")]) == [
        b"a",
        1,
        b"b",
    ]
    with pytest.raises(rx.ResponseError, match="WRONGTYPE"):
        await fast.execute_many([("ECHO", "a"), ("HGET", "s", "f")])
    assert await fast.execute("ECHO", "still") == b"still"


async def test_list_pages_are_the_same_through_both_clients(
    fast: MultiplexedRedis, redis: Redis
) -> None:
    from app import keys
    from app.models import Page
    from app.paging import page_of_hashes

    for i in range(25):
        await redis.hset(keys.phone(f"id{i}"), mapping={"id": f"id{i}", "name": f"P{i}"})
        await redis.zadd(keys.PHONES, {f"id{i}": i})
    for newest_first in (False, True):
        for page in (Page(1, 10), Page(3, 10), Page(4, 10)):
            slow = await page_of_hashes(
                redis, keys.PHONES, page, keys.phone, newest_first=newest_first
            )
            quick = await page_of_hashes(
                redis, keys.PHONES, page, keys.phone, newest_first=newest_first, fast=fast
            )
            assert quick == slow
