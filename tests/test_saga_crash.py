"""The app SIGKILLed at each step of the reservation saga (docs/data-tier.md, section 4),
then recovery by the settler of another instance: real gunicorn instances on one real
redis-server, SAGA_ALWAYS_SPLIT=1 (test-only: one redis-server serves every partition,
where the saga would collapse into one script and have no steps to die between). The killed worker dies by its test-only fault point
(SAGA_FAULT_POINT) right after the step, as kill -9 would leave it.

After each: no unit stays held past the bound (polled, with a deadline far above it),
money and stock are conserved (stock + held + sold = added per phone, the balance moved
by exactly the orders that exist), no order is debited twice, and an Idempotency-Key
retry through the other instance gives one order."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from app import keys
from app.ops.poll import wait_until_async
from app.partitions import partition_of
from loadtests.support.servers import RedisServer, free_port
from loadtests.support.stack import AppInstance
from tests.crash_fixtures import (
    RECOVERY_S,
    TTL_MS,
    api_world,
    at_rest,
    balance,
    crash_instance,
    dies,
    post,
)
from tests.helpers import customer_order_ids


@pytest.fixture(scope="module")
def saga_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(directory=tmp_path_factory.mktemp("saga-redis"), port=free_port())
    server.start()
    yield server
    server.stop()


def _instance(redis: RedisServer, directory: Path, index: int, fault: str) -> AppInstance:
    return crash_instance(
        directory,
        index,
        fault,
        REDIS_URL=redis.url,
        SAGA_ALWAYS_SPLIT="1",
        SAGA_RESERVATION_TTL_MS=str(TTL_MS),
    )


@pytest.fixture(scope="module")
def healthy(
    saga_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AppInstance]:
    """The instance that survives: its settler finishes what the killed one left."""
    instance = _instance(saga_redis, tmp_path_factory.mktemp("healthy"), 0, "")
    instance.start()
    yield instance
    instance.terminate()


@pytest.fixture
async def redis(saga_redis: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(saga_redis.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def faulty(saga_redis: RedisServer, directory: Path, point: str) -> AppInstance:
    instance = _instance(saga_redis, directory, 1, point)
    instance.start()
    return instance


async def test_killed_after_reserving_the_stock_comes_back_and_nothing_is_debited(
    saga_redis: RedisServer,
    healthy: AppInstance,
    redis: Redis,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    phone, customer, auth = await api_world(http, healthy.url)
    dying = faulty(saga_redis, tmp_path, "reserved")
    try:
        order = {"items": [{"phone_id": phone["id"], "quantity": 2}]}
        await dies(http, f"{dying.url}/orders", order, auth)
        assert await at_rest(redis, phone["id"]) == {"stock": 5, "sold": 0, "added": 5}
        assert await balance(redis, customer["id"]) == 1000
        # The fence made the order impossible before the stock came back.
        markers = await redis.hgetall(keys.aborts(partition_of(customer["id"])))
        assert "swept" in markers.values()
        assert await customer_order_ids(redis, customer["id"]) == []
    finally:
        dying.kill()


async def test_killed_after_the_commit_the_order_stands_and_a_retry_replays_it(
    saga_redis: RedisServer,
    healthy: AppInstance,
    redis: Redis,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    phone, customer, auth = await api_world(http, healthy.url)
    keyed = {**auth, "Idempotency-Key": f"crash-commit-{customer['id']}"}
    order = {"items": [{"phone_id": phone["id"], "quantity": 2}]}
    dying = faulty(saga_redis, tmp_path, "committed")
    try:
        await dies(http, f"{dying.url}/orders", order, keyed)
        assert await at_rest(redis, phone["id"]) == {"stock": 3, "sold": 2, "added": 5}
        # The client retries through the other instance: the stored 201, one order.
        async with http.post(f"{healthy.url}/orders", json=order, headers=keyed) as response:
            assert response.status == 201
            assert response.headers["Idempotent-Replayed"] == "true"
            replayed = (await response.json())["order"]
        assert await customer_order_ids(redis, customer["id"]) == [replayed["id"]]
        # The retry's own reservation was released; the units were sold once, debited once.
        assert await at_rest(redis, phone["id"]) == {"stock": 3, "sold": 2, "added": 5}
        assert await balance(redis, customer["id"]) == 1000 - 200
    finally:
        dying.kill()


async def test_killed_after_a_cancels_refund_the_stock_still_comes_back(
    saga_redis: RedisServer,
    healthy: AppInstance,
    redis: Redis,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    phone, customer, auth = await api_world(http, healthy.url)
    order = {"items": [{"phone_id": phone["id"], "quantity": 3}], "autocheck": False}
    status, placed = await post(http, f"{healthy.url}/orders", order, auth)
    assert status == 201
    order_id = placed["order"]["id"]
    assert await at_rest(redis, phone["id"]) == {"stock": 2, "sold": 3, "added": 5}
    dying = faulty(saga_redis, tmp_path, "refunded")
    try:
        await dies(http, f"{dying.url}/orders/{order_id}/cancel", None, auth)
        assert await balance(redis, customer["id"]) == 1000
        due = keys.take_backs_due(partition_of(order_id))

        async def taken_back() -> bool:
            return await redis.zscore(due, order_id) is None

        await wait_until_async(taken_back, "the settler to take the stock back", RECOVERY_S)
        assert await at_rest(redis, phone["id"]) == {"stock": 5, "sold": 0, "added": 5}
    finally:
        dying.kill()
