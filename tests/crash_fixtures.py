"""What the crash tests share (tests/test_saga_crash.py, tests/test_recall_crash.py): the
settler's bound, a small world made through the API, a request whose worker dies at its
fault point, and the wait for a phone to be at rest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from app import keys
from app.ops.poll import wait_until_async
from app.ops.redis_cluster import LocalCluster
from loadtests.support.servers import clean_env, free_port
from loadtests.support.stack import AppInstance
from tests.helpers import ADMIN, ADMIN_TOKEN

# Short, so that the settler's bound (TTL + its 1 s tick + a dead holder's 5 s lease) is
# seconds; the polls below wait far longer than that before failing. Not shorter: a
# reserve or commit that reaches Redis past its expiry is refused, and a busy shared box
# can hold a request that long between its steps.
TTL_MS = 1000
RECOVERY_S = 60


def crash_instance(directory: Path, index: int, fault: str, **env: str) -> AppInstance:
    """One gunicorn worker that dies at ``fault`` (none: the healthy one), on the Redis
    ``env`` names (REDIS_URL, or cluster_env), with no proxy or adaptive shedding between
    the test and the step it kills."""
    return AppInstance(
        index=index,
        port=free_port(),
        env=clean_env(
            ADMIN_TOKEN=ADMIN_TOKEN,
            SAGA_FAULT_POINT=fault,
            WEB_CONCURRENCY="1",
            WEB_ACCESS_LOG="",
            BEHIND_PROXY="0",
            OVERLOAD_ADAPTIVE="0",
            **env,
        ),
        log_path=directory / f"app-{index}.log",
    )


def cluster_env(cluster: LocalCluster) -> dict[str, str]:
    """The app's settings for a local 3+3 cluster: its primaries as the seed nodes."""
    return {
        "REDIS_URL": "redis://127.0.0.1/0",
        "REDIS_CLUSTER_NODES": ",".join(f"127.0.0.1:{port}" for port in cluster.ports[:3]),
    }


async def post(
    http: aiohttp.ClientSession, url: str, body: Any = None, headers: Any = None
) -> tuple[int, dict]:
    async with http.post(url, json=body, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def api_world(http: aiohttp.ClientSession, url: str) -> tuple[dict, dict, dict]:
    """A phone (price 100, stock 5) and a customer (balance 1000) with their token header."""
    status, phone = await post(
        http, f"{url}/phones", {"name": "P", "price_cents": 100, "stock": 5}, ADMIN
    )
    assert status == 201
    email = f"crash-{free_port()}-{id(http)}@example.com"
    status, created = await post(
        http,
        f"{url}/customers",
        {"name": "A", "surname": "B", "email": email, "balance_cents": 1000},
        ADMIN,
    )
    assert status == 201
    auth = {"Authorization": f"Bearer {created['token']}"}
    return phone["phone"], created["customer"], auth


async def dies(http: aiohttp.ClientSession, url: str, body: Any, headers: Any) -> None:
    """The request's worker dies at its fault point: the connection drops, no answer."""
    with pytest.raises(aiohttp.ClientError):
        await post(http, url, body, headers)


async def at_rest(redis: Redis, phone_id: str) -> dict[str, int]:
    """Wait until nothing of the phone is held, then its units; the identity must hold."""

    async def units() -> dict[str, int] | None:
        row = await redis.hmget(keys.phone(phone_id), "stock", "held", "sold", "added_units")
        stock, held, sold, added = (int(v or 0) for v in row)
        if held:
            return None
        return {"stock": stock, "sold": sold, "added": added}

    found = await wait_until_async(units, "the settler to settle what was held", RECOVERY_S)
    assert found["stock"] + found["sold"] == found["added"]
    return found


async def balance(redis: Redis, customer_id: str) -> int:
    return int(await redis.hget(keys.customer(customer_id), "balance_cents"))
