"""Health, readiness, request ids, the in-flight cap, Redis outages, settings, OpenAPI."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urljoin

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app import appkeys
from app.main import create_app
from app.ops.poll import wait_until_async
from app.routes import route_table
from app.settings import Settings, SettingsError
from loadtests.support.servers import free_port
from tests.helpers import ADMIN_TOKEN, Shop


async def test_health_and_readiness(shop: Shop) -> None:
    assert (await (await shop.client.get("/healthz")).json()) == {"status": "ok"}
    ready = await shop.client.get("/readyz")
    assert ready.status == 200


async def test_readyz_reloads_flushed_scripts(shop: Shop) -> None:
    redis = shop.client.app[appkeys.REDIS]
    scripts = shop.client.app[appkeys.SCRIPTS]
    await redis.script_flush()
    assert not await scripts.loaded()
    assert (await shop.client.get("/readyz")).status == 200
    assert await scripts.loaded()


async def script_exists_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_script|exists", {}).get("calls", 0))


async def test_readyz_reuses_its_answer_instead_of_asking_redis_each_time(
    shop: Shop, redis: Redis
) -> None:
    app = shop.client.app
    readiness = app[appkeys.READINESS]
    # No clock in this test: a good answer lives for an hour here, or not at all.
    readiness.ttl = 3600
    before = await script_exists_calls(redis)
    probes = await asyncio.gather(*(shop.client.get("/readyz") for _ in range(100)))
    for _ in range(100):
        probes.append(await shop.client.get("/readyz"))
    assert {probe.status for probe in probes} == {200}
    assert await script_exists_calls(redis) - before == 1  # was 200: one per probe

    # A dropped hot-path connection is news at once: the next probe checks again.
    gateway = app[appkeys.REDIS_GATEWAY]
    assert gateway.connection is not None
    await redis.client_kill_filter(_type="normal", skipme=True)
    await wait_until_async(lambda: gateway.connection is None, "the app to see it killed", 10)
    assert (await shop.client.get("/readyz")).status == 200
    assert (await shop.client.get("/readyz")).status == 200
    assert await script_exists_calls(redis) - before == 2

    # Without reuse, every probe is a SCRIPT EXISTS: the count above measures checks.
    readiness.ttl = 0
    for _ in range(20):
        assert (await shop.client.get("/readyz")).status == 200
    assert await script_exists_calls(redis) - before == 22


async def test_request_id_is_passed_through_or_made(shop: Shop) -> None:
    given = await shop.client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["X-Request-ID"] == "abc-123"
    made = await shop.client.get("/healthz", headers={"X-Request-ID": "bad id; rm"})
    assert made.headers["X-Request-ID"] != "bad id; rm" and len(made.headers["X-Request-ID"]) == 32


async def test_redis_down_gives_503_problem(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("REDIS_TIMEOUT", "0.5")
    client: TestClient = await aiohttp_client(await create_app())
    for path in ("/readyz", "/phones"):
        response = await client.get(path)
        assert response.status == 503, path
        assert response.headers["Retry-After"] == "1"
        problem = await response.json(content_type="application/problem+json")
        assert problem["code"] == "service_unavailable"
    assert (await client.get("/healthz")).status == 200


async def test_inflight_cap_sheds_with_503(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch, app_env: dict[str, str]
) -> None:
    monkeypatch.setenv("MAX_INFLIGHT", "3")
    client: TestClient = await aiohttp_client(await create_app())
    gauge = client.app[appkeys.INFLIGHT]
    held = [asyncio.ensure_future(client.get("/bench/sleep?ms=3000")) for _ in range(3)]
    await wait_until_async(lambda: gauge.current == 3, "the three held requests in flight", 10)
    # The cap is full: every further request is shed while the three are served.
    responses = await asyncio.gather(*(client.get("/bench/sleep?ms=1") for _ in range(7)))
    assert gauge.current == 3, "the held requests ended before the others were refused"
    assert [response.status for response in responses] == [503] * 7
    assert [response.status for response in await asyncio.gather(*held)] == [200] * 3
    shed = responses[0]
    assert int(shed.headers["Retry-After"]) >= 1
    assert (await shed.json(content_type="application/problem+json"))["code"] == "overloaded"
    # Health stays reachable while saturated; the cap frees up afterwards.
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/bench/sleep?ms=1")).status == 200


def test_settings_validation() -> None:
    base = {"ADMIN_TOKEN": ADMIN_TOKEN}
    settings = Settings.from_env(base)
    assert settings.max_inflight == 256 and settings.redis_timeout == 2.0
    assert ADMIN_TOKEN not in repr(settings)
    for bad in (
        {},
        {"ADMIN_TOKEN": "short"},
        {**base, "MAX_INFLIGHT": "0"},
        {**base, "MAX_INFLIGHT": "many"},
        {**base, "REDIS_TIMEOUT": "nan"},
        {**base, "REDIS_URL": "http://x"},
        {**base, "BENCH_ROUTES": "maybe"},
    ):
        with pytest.raises(SettingsError):
            Settings.from_env(bad)
    with pytest.raises(AttributeError):
        settings.max_inflight = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "token",
    [
        "has a space in it, 0123456789",
        'quote"d-0123456789abcdef',
        "unicode-é-0123456789abcdef",
        "semicolon;0123456789abcdef",
        "padding=in-the-middle-0123456789",
        "x" * 513,
    ],
)
async def test_an_admin_token_that_can_never_authenticate_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, app_env: dict[str, str], token: str
) -> None:
    monkeypatch.setenv("ADMIN_TOKEN", token)
    with pytest.raises(SettingsError, match="ADMIN_TOKEN can never authenticate") as refused:
        await create_app()
    assert token not in str(refused.value)  # a secret, even a broken one


async def test_an_admin_token_using_every_allowed_character_authenticates(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch, app_env: dict[str, str], redis: Any
) -> None:
    token = "AZaz09-._~+/" + "q" * 500 + "=="
    monkeypatch.setenv("ADMIN_TOKEN", token)
    client: TestClient = await aiohttp_client(await create_app())
    response = await client.get("/admin/audit", headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200, await response.text()


async def test_bench_routes_are_off_by_default(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch, app_env: dict[str, str]
) -> None:
    monkeypatch.delenv("BENCH_ROUTES")
    client: TestClient = await aiohttp_client(await create_app())
    assert (await client.get("/bench/hello")).status == 404


async def test_openapi_covers_every_route_with_request_schemas(shop: Shop) -> None:
    spec = await (await shop.client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.1")
    for route in route_table(bench=False):  # aliases included
        operation = spec["paths"][route.path][route.method.lower()]
        assert str(route.status) in operation["responses"]
        if route.body is not None:
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            name = schema["$ref"].rsplit("/", 1)[1]
            component = spec["components"]["schemas"][name]
            assert component["additionalProperties"] is False
    line = spec["components"]["schemas"]["OrderLine"]["properties"]["quantity"]
    assert (line["minimum"], line["maximum"]) == (1, 100)


async def test_openapi_servers_is_one_relative_entry(shop: Shop) -> None:
    """Issue 18 item 6: the base URL a client resolves from the document is the
    origin that served it, whatever host and port that was."""
    served_from = shop.client.make_url("/openapi.json")
    spec = await (await shop.client.get("/openapi.json")).json()
    assert spec["servers"] == [{"url": "/"}]
    base = urljoin(str(served_from), spec["servers"][0]["url"])
    assert base == str(shop.client.make_url("/"))
    response = await shop.client.session.get(urljoin(base, "phones"))
    assert response.status == 200


async def test_request_id_is_not_trusted_without_a_proxy(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch, app_env: dict[str, str]
) -> None:
    monkeypatch.setenv("BEHIND_PROXY", "0")
    client: TestClient = await aiohttp_client(await create_app())
    response = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] != "abc-123"
