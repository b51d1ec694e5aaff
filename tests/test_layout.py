"""The key layout marker (app/layout.py): a fresh Redis gets it on first start, an
older layout's data makes `make run`'s web launcher refuse to start, saying what to do."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from app import keys
from app.layout import LayoutError, check_layout
from app.ops.instances import ROOT
from loadtests.support.servers import free_port
from tests.helpers import Shop


def _sync(redis: Redis) -> SyncRedis:
    kwargs = redis.connection_pool.connection_kwargs
    return SyncRedis(host=kwargs["host"], port=kwargs["port"])


def _launch(redis: Redis) -> subprocess.CompletedProcess:
    """`make run`'s web process (the Procfile's web line) on this test's Redis."""
    kwargs = redis.connection_pool.connection_kwargs
    env = {
        **os.environ,
        "REDIS_URL": f"redis://{kwargs['host']}:{kwargs['port']}/0",
        "WEB_INSTANCES": "1",
        "APP_BASE_PORT": str(free_port()),
    }
    return subprocess.run(
        [sys.executable, "-m", "app.ops.instances"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_fresh_redis_gets_the_marker_once(redis: Redis) -> None:
    client = _sync(redis)
    try:
        assert check_layout(client) is True
        assert await redis.get(keys.LAYOUT) == str(keys.LAYOUT_VERSION).encode()
        assert check_layout(client) is False
    finally:
        client.close()


async def test_data_of_this_layout_without_a_marker_is_this_layout(
    shop: Shop, redis: Redis
) -> None:
    """A shop written by this version before any launcher ran (the tests' own stacks)."""
    await shop.phone()
    await shop.customer()
    client = _sync(redis)
    try:
        assert check_layout(client) is True
    finally:
        client.close()


@pytest.mark.parametrize("old_key", keys.OLD_LAYOUT_KEYS)
async def test_an_older_layout_is_refused_and_left_as_it_was(redis: Redis, old_key: str) -> None:
    await redis.set(old_key, "1")  # its type does not matter: its name does
    client = _sync(redis)
    try:
        with pytest.raises(LayoutError, match="fresh data directory") as refused:
            check_layout(client)
    finally:
        client.close()
    assert old_key in str(refused.value)
    assert await redis.exists(keys.LAYOUT) == 0


async def test_another_layout_version_is_refused(redis: Redis) -> None:
    other = str(keys.LAYOUT_VERSION + 1)
    await redis.set(keys.LAYOUT, other)
    client = _sync(redis)
    try:
        with pytest.raises(LayoutError, match=f"'layout' is b'{other}'"):
            check_layout(client)
    finally:
        client.close()


@pytest.mark.parametrize("version", range(2, keys.LAYOUT_VERSION))
async def test_every_earlier_layout_version_is_refused_saying_what_to_do(
    redis: Redis, version: int
) -> None:
    """Layout 4 had indexes of all orders (oa, co without a status) that layout 5 no
    longer writes or reads (their memory would never come back); layout 5's order hashes
    have the long field names, which layout 6 does not read (its orders would look
    empty); layout 6's status indexes are one zset each, which layout 7 does not list
    (it reads status chunks); layout 7's Idempotency-Key buckets are 6 hours wide, where
    layout 8 looks only in day-wide ones; layout 8's order clock lacks the chunk state
    layout 9 keeps there. No migration: a fresh directory."""
    await redis.set(keys.LAYOUT, version)
    await redis.zadd("oa{A}", {"AAAAAAAAAAAAAAAAAAAAAA": 1})  # as layout 4 indexed all orders
    before = {key: await redis.dump(key) for key in await redis.keys("*")}
    client = _sync(redis)
    try:
        with pytest.raises(LayoutError) as refused:
            check_layout(client)
    finally:
        client.close()
    message = str(refused.value)
    assert f"'layout' is b'{version}'" in message
    assert f"layout {keys.LAYOUT_VERSION}" in message and "fresh data directory" in message
    assert "mv var/redis var/redis.old-layout" in message
    assert "status lists in chunks" in message
    assert {key: await redis.dump(key) for key in await redis.keys("*")} == before


async def test_make_runs_web_launcher_refuses_the_previous_layout(redis: Redis) -> None:
    """What `make run` shows on a var/redis of the previous layout version."""
    previous = keys.LAYOUT_VERSION - 1
    await redis.set(keys.LAYOUT, previous)
    result = await asyncio.to_thread(_launch, redis)
    assert result.returncode == 2, result.stderr
    assert "not starting" in result.stderr
    assert f"'layout' is b'{previous}'" in result.stderr and "mv var/redis" in result.stderr
    assert "instances on" not in result.stderr
    assert await redis.get(keys.LAYOUT) == str(previous).encode()


async def test_make_runs_web_launcher_refuses_an_old_data_directory(redis: Redis) -> None:
    """What `make run` shows on an old var/redis: the launcher stops with status 2
    before any instance starts (honcho then stops the stack), saying what to do."""
    old_ledger, old_phones = "ledger", "phones"  # as the previous layout named them
    assert {old_ledger, old_phones} <= set(keys.OLD_LAYOUT_KEYS)
    await redis.hset(old_ledger, mapping={"balance_cents": 100, "changes": 1})
    await redis.zadd(old_phones, {"AAAAAAAAAAAAAAAAAAAAAA": 1})
    result = await asyncio.to_thread(_launch, redis)
    assert result.returncode == 2, result.stderr
    assert "not starting" in result.stderr
    assert "older key layout" in result.stderr and "mv var/redis" in result.stderr
    assert "instances on" not in result.stderr
    assert await redis.exists(keys.LAYOUT) == 0
