"""app/fastredis.py against a real redis-server: replies, redis-py's error classes,
order under concurrency, lost connections, timeouts, and the scripts' NOSCRIPT path."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, Redis

from app import appkeys, keys
from app.fastredis import MultiplexedRedis
from app.main import create_app
from app.ops.poll import wait_until_async
from app.redis_gateway import RedisGateway, gateway_over
from app.scripts import Scripts
from loadtests.support.servers import RedisServer
from tests.helpers import Shop


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
    # Kill only once the BLPOP is in flight, blocked in Redis.

    async def in_blpop() -> bool:
        clients = await redis.client_list()
        return any(c["name"] == "fast-under-test" and c["cmd"] == "blpop" for c in clients)

    await wait_until_async(in_blpop, "the BLPOP blocked in Redis", 4)
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
    scripts = Scripts(RedisGateway(fast))
    await redis.script_flush()
    # create_phone through the multiplexed connection: NOSCRIPT, SCRIPT LOAD, EVALSHA.
    phone_id = "AAAAAAAAAAAAAAAAAAAAAA"  # partition 0
    result = await scripts.run(
        "create_phone",
        [keys.phone(phone_id), keys.phones(0), keys.phones_seq(0), keys.ledger(0)],
        [phone_id, "P", "", "", 100, 3, 1],
    )
    assert result.status == 201
    assert result.payload["stock"] == "3"
    assert await redis.hget(keys.phone(phone_id), "stock") == b"3"


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


async def test_list_pages_are_the_same_through_both_transports(
    fast: MultiplexedRedis, redis: Redis
) -> None:
    from app.paging import merged_page_of_hashes, page_of_hashes
    from app.partitions import PARTITIONS, new_id
    from app.query import Page

    indexes = [keys.phones(p) for p in range(PARTITIONS)]
    for i in range(25):
        phone_id = new_id(i % 3)
        await redis.hset(keys.phone(phone_id), mapping={"id": phone_id, "name": f"P{i}"})
        await redis.zadd(keys.phones(i % 3), {phone_id: i})
    for newest_first in (False, True):
        for page in (Page(1, 10), Page(3, 10), Page(4, 10)):
            slow = await page_of_hashes(
                gateway_over(redis), keys.phones(0), page, keys.phone, newest_first=newest_first
            )
            quick = await page_of_hashes(
                RedisGateway(fast), keys.phones(0), page, keys.phone, newest_first=newest_first
            )
            assert quick == slow
            merged = await merged_page_of_hashes(
                RedisGateway(fast), indexes, page, keys.phone, newest_first=newest_first
            )
            assert merged == await merged_page_of_hashes(
                gateway_over(redis), indexes, page, keys.phone, newest_first=newest_first
            )


# ---- recovery from time-outs (issue 13, item 2) ------------------------------------


class SilentServer:
    """A real socket that accepts connections, reads what comes and never answers."""

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            self._changed.set()
            writer.close()

    async def until_open(self, count: int) -> None:
        """Wait until exactly ``count`` connections are open (the others closed)."""
        async with asyncio.timeout(10):
            while True:
                self._changed.clear()
                if self.open == count:
                    return
                await self._changed.wait()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_a_server_that_never_answers_is_dropped_and_reconnected() -> None:
    server = SilentServer()
    port = await server.start()
    client = MultiplexedRedis(host="127.0.0.1", port=port, timeout=0.2)
    try:
        outcomes = []
        for _ in range(5):
            with pytest.raises((rx.TimeoutError, rx.ConnectionError)) as failed:
                await client.execute("PING")
            outcomes.append(type(failed.value))
            assert client._protocol is not None
            # Never more than the one timed-out command owed on a connection.
            assert len(client._protocol.waiters) <= 1
        assert outcomes == [rx.TimeoutError] * 5
        # The 2nd and 4th time-outs each found the 1st (3rd) still owed: the
        # connection was dropped and the next command made a new one.
        await server.until_open(1)
        assert server.accepted == 3
    finally:
        await client.aclose()
        await server.stop()


async def test_concurrent_commands_on_a_silent_server_fail_together_then_reconnect() -> None:
    server = SilentServer()
    port = await server.start()
    client = MultiplexedRedis(host="127.0.0.1", port=port, timeout=0.2)
    try:
        results = await asyncio.gather(
            *(client.execute("PING") for _ in range(50)), return_exceptions=True
        )
        assert all(isinstance(r, (rx.TimeoutError, rx.ConnectionError)) for r in results)
        assert client.connection is None  # dropped: nothing is queued on it any more
        with pytest.raises(rx.TimeoutError):
            await client.execute("PING")
        await server.until_open(1)
        assert server.accepted == 2
    finally:
        await client.aclose()
        await server.stop()


async def test_debug_sleep_times_out_boundedly_and_recovers_in_order(
    fast: MultiplexedRedis, redis: Redis, redis_server: RedisServer
) -> None:
    fast._timeout = 0.2
    assert await fast.execute("PING") == b"PONG"
    clients_before = (await redis.info("clients"))["connected_clients"]
    sleeper = asyncio.create_task(asyncio.to_thread(redis_server.cli, "DEBUG", "SLEEP", "3"))
    # Redis is asleep once a command gets no answer in time.
    async with asyncio.timeout(10):
        while True:
            try:
                await fast.execute("PING")
            except rx.TimeoutError:
                break
    most_owed = 0
    failures = 1
    for _ in range(5):
        try:
            await fast.execute("PING")
        except (rx.TimeoutError, rx.ConnectionError):
            failures += 1
        if fast._protocol is not None:
            most_owed = max(most_owed, len(fast._protocol.waiters))
    await sleeper
    assert failures >= 2
    # Without the drop, every timed-out PING would still be queued on the one connection.
    assert most_owed <= 1
    # Awake again: every reply goes to its own command, on one connection.
    echoes = await asyncio.gather(*(fast.execute("ECHO", str(i)) for i in range(200)))
    assert echoes == [str(i).encode() for i in range(200)]

    async def back_to_before() -> bool:
        return (await redis.info("clients"))["connected_clients"] == clients_before

    await wait_until_async(back_to_before, "the dropped connections closed in Redis", 10)


class FreezingRelay:
    """A TCP relay to Redis whose connections can go silent: after ``freeze()``
    the ones it relays stay open but nothing passes either way, as when a
    network path dies without a reset. Connections made afterwards relay."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._frozen: set[int] = set()
        self._pairs: list[int] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        self._frozen.update(self._pairs)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pair = len(self._pairs)
        self._pairs.append(pair)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    if pair not in self._frozen:
                        sink.write(data)
            except ConnectionError:
                pass
            finally:
                sink.close()

        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(pump(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in tuple(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def test_the_hot_path_recovers_from_a_silent_path_and_readyz_follows_it(
    aiohttp_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    app_env: dict[str, str],
    redis: Redis,
    redis_server: RedisServer,
) -> None:
    relay = FreezingRelay(redis_server.port)
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{await relay.start()}/0")
    monkeypatch.setenv("REDIS_TIMEOUT", "0.3")
    try:
        client: TestClient = await aiohttp_client(await create_app())
        # Every probe checks Redis here: what is looked at is the check, not the cache.
        client.app[appkeys.READINESS].ttl = 0
        assert (await Shop(client).phone())["stock"] == 10
        assert (await client.get("/phones")).status == 200
        assert (await client.get("/readyz")).status == 200

        relay.freeze()
        seen: list[tuple[int, int]] = []
        for _ in range(10):
            ready = (await client.get("/readyz")).status
            phones = (await client.get("/phones")).status
            seen.append((ready, phones))
            if (ready, phones) == (200, 200):
                break
        # Not ready while the orders' connection is stuck; ready only when it
        # serves again; and it does, on a new connection, without any restart.
        assert seen[0] == (503, 503), seen
        assert all(phones == 200 for ready, phones in seen if ready == 200), seen
        assert seen[-1] == (200, 200), seen
    finally:
        await relay.stop()
