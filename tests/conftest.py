"""Fixtures over real processes: one redis-server per session on a free port,
flushed before each test, and the aiohttp app wired to it through the same
environment variables production uses."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.main import create_app
from tests.servers import RedisServer, free_port

# The whole stack (redis, gunicorn instances, nginx) as one fixture.
pytest_plugins = ["tests.stack", "tests.mail_fixtures", "tests.cluster"]

ADMIN_TOKEN = "test-admin-token-0123456789"


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


# What a test of a race or of idempotency needs: every request of its burst
# reaches the handler. The adaptive limit (app/overload.py) shrinks when a
# loaded box makes answers slow, and new work may only fill 80% of it, so a
# few of a 500-request burst were refused 503 `overloaded` now and then. A
# fixed cap (OVERLOAD_ADAPTIVE=0, no queue-time refusals either) well above
# any burst keeps those tests about what they name; tests/test_overload.py
# covers the shedding itself.
NO_SHEDDING_ENV = {"OVERLOAD_ADAPTIVE": "0", "MAX_INFLIGHT": "2000"}


def without_shedding(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """app_env with NO_SHEDDING_ENV set, for a module's own ``app_env`` fixture."""
    for name, value in NO_SHEDDING_ENV.items():
        monkeypatch.setenv(name, value)
    return {**app_env, **NO_SHEDDING_ENV}


@pytest.fixture
async def client(aiohttp_client: Any, app_env: dict[str, str], redis: Redis) -> TestClient:
    return await aiohttp_client(await create_app())


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
_emails = itertools.count()


@dataclass
class Shop:
    """Drives the API as a client would: admin set-up and customer calls."""

    client: TestClient

    async def phone(self, price_cents: int = 10_000, stock: int = 10, name: str = "Pixel") -> dict:
        response = await self.client.post(
            "/phones",
            json={"name": name, "price_cents": price_cents, "stock": stock},
            headers=ADMIN,
        )
        assert response.status == 201, await response.text()
        return (await response.json())["phone"]

    async def customer(self, balance_cents: int = 1_000_000) -> tuple[dict, dict[str, str]]:
        """A new customer and the Authorization header of their token."""
        response = await self.client.post(
            "/customers",
            json={
                "name": "Ada",
                "surname": "Lovelace",
                "email": f"ada{next(_emails)}@example.com",
                "balance_cents": balance_cents,
            },
            headers=ADMIN,
        )
        assert response.status == 201, await response.text()
        body = await response.json()
        return body["customer"], {"Authorization": f"Bearer {body['token']}"}

    async def order(self, auth: dict[str, str], lines: list[tuple[str, int]], **extra: Any):
        return await self.client.post(
            "/orders",
            json={"items": [{"phone_id": p, "quantity": q} for p, q in lines], **extra},
            headers=auth,
        )

    async def audit(self) -> dict:
        response = await self.client.get("/admin/audit", headers=ADMIN)
        assert response.status == 200
        return await response.json()


@pytest.fixture
def shop(client: TestClient) -> Shop:
    return Shop(client)
