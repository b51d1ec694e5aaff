"""Fixtures over real processes: one redis-server per session on a free port,
flushed before each test, and the aiohttp app wired to it through the same
environment variables production uses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.main import create_app
from loadtests.support.servers import RedisServer, free_port
from tests.helpers import ADMIN_TOKEN, Shop

# The whole stack (redis, gunicorn instances, nginx) as one fixture.
pytest_plugins = ["tests.stack", "tests.mail_fixtures", "tests.cluster", "tests.saga_fixtures"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(directory=Path(tmp_path_factory.mktemp("redis")), port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A client on a flushed database: every test starts from an empty shop."""
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def app_env(monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer) -> dict[str, str]:
    env = {"REDIS_URL": redis_server.url, "ADMIN_TOKEN": ADMIN_TOKEN, "BENCH_ROUTES": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
async def client(aiohttp_client: Any, app_env: dict[str, str], redis: Redis) -> TestClient:
    return await aiohttp_client(await create_app())


@pytest.fixture
def shop(client: TestClient) -> Shop:
    return Shop(client)
