"""Issue 3 through the real stack: nginx in front of 2 gunicorn instances x 2
workers on a real redis-server (loadtests/support/stack.py). Routing, the seed ports,
overflow protection, failover, graceful shutdown, load shedding and outages."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from app.ops.poll import wait_until_async
from loadtests.support.stack import FullStack, start_full_stack

PROBLEM = "application/problem+json"
TIMEOUT = aiohttp.ClientTimeout(total=60)


async def problem_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    assert response.content_type == PROBLEM, await response.text()
    body = await response.json(content_type=PROBLEM)
    assert body["status"] == response.status
    assert {"type", "title", "detail", "code"} <= set(body)
    return body


async def create_phone(
    http: aiohttp.ClientSession, base: str, stack: FullStack, stock: int = 100
) -> dict:
    response = await http.post(
        f"{base}/phones",
        json={
            "name": "Stack phone",
            "description": "through the whole stack",
            "image_url": "/img/stack.png",
            "price_cents": 1000,
            "stock": stock,
        },
        headers=stack.admin_headers,
    )
    assert response.status == 201, await response.text()
    return (await response.json())["phone"]


async def create_customer(
    http: aiohttp.ClientSession, base: str, stack: FullStack, balance_cents: int = 1_000_000
) -> tuple[dict, dict[str, str]]:
    response = await http.post(
        f"{base}/customers",
        json={
            "name": "Grace",
            "surname": "Hopper",
            "email": f"grace-{uuid.uuid4().hex}@example.com",
            "balance_cents": balance_cents,
        },
        headers=stack.admin_headers,
    )
    assert response.status == 201, await response.text()
    body = await response.json()
    return body["customer"], {"Authorization": f"Bearer {body['token']}"}


# ---- routing ------------------------------------------------------------------------


async def test_every_route_works_through_nginx(full_stack: FullStack) -> None:
    base = full_stack.http_url
    admin = full_stack.admin_headers
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        for path in ("/healthz", "/readyz", "/openapi.json"):
            async with http.get(f"{base}{path}") as response:
                assert response.status == 200, path

        phone = await create_phone(http, base, full_stack)
        async with http.get(f"{base}/phones", params={"per_page": "5"}) as response:
            assert response.status == 200
            assert {"phones", "page", "per_page", "total", "pageCount"} <= set(
                await response.json()
            )
        async with http.get(f"{base}/phones/{phone['id']}") as response:
            assert (await response.json())["phone"]["id"] == phone["id"]
        async with http.patch(
            f"{base}/phones/{phone['id']}", json={"price_cents": 1500}, headers=admin
        ) as response:
            assert response.status == 200, await response.text()
        async with http.post(
            f"{base}/phones/{phone['id']}/restock", json={"quantity": 5}, headers=admin
        ) as response:
            assert response.status == 200, await response.text()

        customer, auth = await create_customer(http, base, full_stack)
        async with http.get(f"{base}/customers/{customer['id']}", headers=auth) as response:
            assert response.status == 200
        async with http.post(
            f"{base}/customers/{customer['id']}/deposit", json={"amount_cents": 500}, headers=admin
        ) as response:
            assert response.status == 200, await response.text()

        order_ids = []
        for _ in range(2):
            async with http.post(
                f"{base}/orders",
                json={"items": [{"phone_id": phone["id"], "quantity": 1}], "autocheck": False},
                headers={**auth, "Idempotency-Key": uuid.uuid4().hex},
            ) as response:
                assert response.status == 201, await response.text()
                order = (await response.json())["order"]
                assert order["status"] == "open"
                order_ids.append(order["id"])
        async with http.get(f"{base}/orders", headers=auth) as response:
            listed = [o["id"] for o in (await response.json())["orders"]]
            assert sorted(listed) == sorted(order_ids)
        async with http.get(f"{base}/orders/{order_ids[0]}", headers=auth) as response:
            assert response.status == 200
        async with http.post(f"{base}/orders/{order_ids[0]}/check", headers=auth) as response:
            assert (await response.json())["order"]["status"] == "completed"
        async with http.post(f"{base}/orders/{order_ids[1]}/cancel", headers=auth) as response:
            assert (await response.json())["order"]["status"] == "cancelled"
        async with http.get(f"{base}/admin/audit", headers=admin) as response:
            assert response.status == 200
            assert (await response.json())["ok"] is True


async def test_request_id_is_passed_through_or_generated(full_stack: FullStack) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        given = f"client-{uuid.uuid4().hex}"
        async with http.get(f"{full_stack.http_url}/healthz", headers={"X-Request-ID": given}) as r:
            assert r.headers.getall("X-Request-ID") == [given]
        async with http.get(f"{full_stack.http_url}/healthz") as response:
            (generated,) = response.headers.getall("X-Request-ID")
            assert len(generated) == 32
        async with http.get(
            f"{full_stack.http_url}/healthz", headers={"X-Request-ID": "bad id\twith spaces"}
        ) as response:
            (replaced,) = response.headers.getall("X-Request-ID")
            assert replaced != "bad id\twith spaces"
    log = full_stack.nginx.access_log.read_text()
    assert f'"request_id":"{given}"' in log
    assert full_stack.admin_token not in log


async def test_seed_ports_serve_only_their_routes(full_stack: FullStack) -> None:
    phones_port, orders_port = full_stack.seed_phones_url, full_stack.seed_orders_url
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.post(
            f"{phones_port}/phones/create",
            json={"name": "Seed", "description": "seed", "imageurl": "/s.png", "price": "9.99"},
            headers=full_stack.admin_headers,
        ) as response:
            assert response.status == 201, await response.text()
            phone = (await response.json())["phone"]
        async with http.post(
            f"{phones_port}/phones/{phone['id']}/restock",
            json={"quantity": 10},
            headers=full_stack.admin_headers,
        ) as response:
            assert response.status == 200
        async with http.get(f"{phones_port}/phones", params={"page": "1"}) as response:
            assert {"phones", "page", "total", "pageCount"} <= set(await response.json())
        for path in ("/orders", "/customers/x", "/admin/audit", "/"):
            async with http.get(f"{phones_port}{path}") as response:
                assert response.status == 404, path
                assert (await problem_of(response))["code"] == "not_found"

        _, auth = await create_customer(http, full_stack.direct_url, full_stack)
        async with http.post(
            f"{orders_port}/orders/create", json={"phones": [phone["id"]]}, headers=auth
        ) as response:
            assert response.status == 201, await response.text()
        order_ids = []
        for _ in range(2):
            async with http.post(
                f"{orders_port}/orders",
                json={"items": [{"phone_id": phone["id"], "quantity": 1}], "autocheck": False},
                headers=auth,
            ) as response:
                assert response.status == 201, await response.text()
                order_ids.append((await response.json())["order"]["id"])
        async with http.post(f"{orders_port}/orders/check/{order_ids[0]}", headers=auth) as r:
            assert (await r.json())["order"]["status"] == "completed"
        async with http.post(f"{orders_port}/phones/check/{order_ids[1]}", headers=auth) as r:
            assert (await r.json())["order"]["status"] == "completed"
        async with http.get(f"{orders_port}/orders", headers=auth) as response:
            assert len((await response.json())["orders"]) == 3
        for path in ("/phones", f"/phones/{phone['id']}", "/customers"):
            async with http.get(f"{orders_port}{path}") as response:
                assert response.status == 404, path
                await problem_of(response)


# ---- overflow protection ---------------------------------------------------------------


async def test_write_burst_gets_429_problem_with_retry_after(full_stack: FullStack) -> None:
    config = full_stack.nginx.config
    rate = int(config.limit_write_rate.split("r/")[0])
    assert config.limit_write_rate.endswith("r/s")
    # A token nobody holds: nginx buckets by it all the same, the app answers 401.
    headers = {"Authorization": f"Bearer burst-{uuid.uuid4().hex}"}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:

        async def post() -> tuple[int, dict[str, str], bytes]:
            async with http.post(f"{full_stack.http_url}/orders", json={}, headers=headers) as r:
                return r.status, dict(r.headers), await r.read()

        started = time.monotonic()
        results = await asyncio.gather(*(post() for _ in range(150)))
        elapsed = time.monotonic() - started

    statuses = Counter(status for status, _, _ in results)
    assert set(statuses) == {401, 429}, statuses
    # The limit holds: 1 + burst pass at once, then `rate` per second.
    assert statuses[401] <= 1 + config.limit_write_burst + math.ceil(rate * elapsed), statuses
    for status, response_headers, body in results:
        if status == 429:
            assert response_headers["Content-Type"] == PROBLEM
            assert int(response_headers["Retry-After"]) >= 1
            assert b'"code":"rate_limited"' in body
            assert b"<html" not in body.lower()


async def test_100kb_body_gets_413_problem_json(full_stack: FullStack) -> None:
    _, auth = await _customer(full_stack)
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as http,
        http.post(
            f"{full_stack.http_url}/orders",
            data=b'{"items": [' + b" " * 100_000 + b"]}",
            headers={**auth, "Content-Type": "application/json"},
        ) as response,
    ):
        assert response.status == 413
        assert (await problem_of(response))["code"] == "payload_too_large"
        assert response.headers["X-Request-ID"]


async def _customer(stack: FullStack) -> tuple[dict, dict[str, str]]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        return await create_customer(http, stack.direct_url, stack)


@pytest.fixture(scope="module")
def tiny_inflight_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullStack]:
    """2 instances x 1 worker, each worker taking at most 2 requests at once."""
    directory = Path(tmp_path_factory.mktemp("tiny-inflight"))
    with start_full_stack(directory, workers=1, env={"MAX_INFLIGHT": "2"}) as stack:
        yield stack


async def test_tiny_max_inflight_sheds_a_burst_with_503s(tiny_inflight_stack: FullStack) -> None:
    stack = tiny_inflight_stack
    capacity = len(stack.instances) * 1 * 2  # instances x workers x MAX_INFLIGHT
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:

        async def slow() -> tuple[int, dict[str, str], bytes]:
            async with http.get(f"{stack.http_url}/bench/sleep", params={"ms": "2000"}) as r:
                return r.status, dict(r.headers), await r.read()

        results = await asyncio.gather(*(slow() for _ in range(40)))
        for base in stack.instance_urls:
            async with http.get(f"{base}/healthz") as response:
                assert response.status == 200  # probes are exempt from the cap

    statuses = Counter(status for status, _, _ in results)
    # Fast answers either way, never a timeout.
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] >= 40 - capacity
    # Shed, not queued: nothing beyond the capacity was served late.
    assert 1 <= statuses[200] <= capacity, statuses
    for status, headers, body in results:
        if status == 503:
            assert headers["Content-Type"] == PROBLEM
            assert int(headers["Retry-After"]) >= 1
            assert b'"status":503' in body


# ---- failover and graceful shutdown ---------------------------------------------------------


async def test_kill_9_an_instance_while_reading_fails_no_get(full_stack: FullStack) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        phone = await create_phone(http, full_stack.direct_url, full_stack)
        url = f"{full_stack.http_url}/phones/{phone['id']}"
        statuses: Counter[int] = Counter()
        failures: list[str] = []
        stop = asyncio.Event()

        async def reader() -> None:
            while not stop.is_set():
                try:
                    async with http.get(url) as response:
                        await response.read()
                        statuses[response.status] += 1
                except aiohttp.ClientError as error:
                    failures.append(repr(error))

        async def until(total: int) -> None:
            await wait_until_async(
                lambda: statuses.total() + len(failures) >= total, f"{total} answers", 30
            )

        readers = [asyncio.create_task(reader()) for _ in range(4)]
        await until(100)
        await asyncio.to_thread(full_stack.kill_instance, 0)
        after_kill = statuses.total() + len(failures)
        await until(after_kill + 300)
        stop.set()
        await asyncio.gather(*readers)

    assert failures == []
    assert set(statuses) == {200}, statuses


async def test_post_retried_with_idempotency_key_across_a_kill_makes_one_order(
    full_stack: FullStack,
) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        phone = await create_phone(http, full_stack.direct_url, full_stack)
        customer, auth = await create_customer(http, full_stack.direct_url, full_stack)
        headers = {**auth, "Idempotency-Key": f"kill-{uuid.uuid4().hex}"}
        body = {"items": [{"phone_id": phone["id"], "quantity": 1}]}
        answers: list[int | str] = []

        async def post_until_answered() -> bytes:
            """What a client does: retry the same request with the same key."""
            for _ in range(100):
                try:
                    async with http.post(
                        f"{full_stack.http_url}/orders", json=body, headers=headers
                    ) as response:
                        answers.append(response.status)
                        if response.status == 201:
                            return await response.read()
                        await response.read()
                except aiohttp.ClientError as error:
                    answers.append(repr(error))
                await asyncio.sleep(0.05)
            raise AssertionError(f"never answered 201: {answers}")

        # The fault must hit the first attempt: with Redis pausing writes, send
        # it to instance 1 and kill that instance while its script waits in Redis.
        redis = Redis.from_url(full_stack.redis.url)
        try:
            await redis.execute_command("CLIENT", "PAUSE", "30000", "WRITE")
            first_attempt = asyncio.ensure_future(
                http.post(f"{full_stack.instance_urls[1]}/orders", json=body, headers=headers)
            )

            async def reached_redis() -> bool:
                return any(c["cmd"] == "evalsha" for c in await redis.client_list())

            await wait_until_async(reached_redis, "the first attempt to reach Redis", 30)
            await asyncio.to_thread(full_stack.kill_instance, 1)
        finally:
            await redis.execute_command("CLIENT", "UNPAUSE")
            await redis.aclose()
        try:
            answer = await first_attempt
            answers.append(answer.status)
            answer.release()
        except aiohttp.ClientError as error:
            answers.append(repr(error))
        assert not isinstance(answers[0], int), f"the first attempt was answered: {answers}"
        first = await post_until_answered()
        replay = await post_until_answered()
        assert replay == first

        async with http.get(f"{full_stack.http_url}/orders", headers=auth) as response:
            assert len((await response.json())["orders"]) == 1
        async with http.get(f"{full_stack.http_url}/customers/{customer['id']}", headers=auth) as r:
            assert (await r.json())["customer"]["balance_cents"] == 1_000_000 - 1000
    # After the killed first attempt, nginx answers every retry (409: an attempt in flight).
    assert set(answers[1:]) <= {201, 409, 503}, answers


async def in_flight(http: aiohttp.ClientSession, instance_url: str) -> float:
    """Requests an instance's workers are serving now, from its /metrics."""
    async with http.get(f"{instance_url}/metrics") as response:
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("phoneshop_http_requests_in_flight")
    )


async def test_sigterm_during_slow_requests_completes_every_one(full_stack: FullStack) -> None:
    instance = full_stack.instances[0]
    sent = 0
    all_sent = asyncio.Event()

    async def on_headers_sent(*_: object) -> None:
        nonlocal sent
        sent += 1
        if sent == 20:
            all_sent.set()

    tracing = aiohttp.TraceConfig()
    tracing.on_request_headers_sent.append(on_headers_sent)
    async with aiohttp.ClientSession(timeout=TIMEOUT, trace_configs=[tracing]) as http:

        async def slow(base: str) -> int:
            async with http.get(f"{base}/bench/sleep", params={"ms": "3000"}) as response:
                answer = await response.json()
                assert answer.get("slept_ms") == 3000, (response.status, answer)
                return response.status

        direct = [asyncio.create_task(slow(instance.url)) for _ in range(10)]
        proxied = [asyncio.create_task(slow(full_stack.http_url)) for _ in range(10)]
        # Every request is on the wire; SIGTERM once the workers are serving all 20.
        await asyncio.wait_for(all_sent.wait(), 30)

        async def all_in_flight() -> bool:
            return sum([await in_flight(http, url) for url in full_stack.instance_urls]) >= 20

        await wait_until_async(all_in_flight, "the 20 requests to be in flight together", 30)
        status = await asyncio.to_thread(full_stack.terminate_instance, 0)
        results = await asyncio.gather(*direct, *proxied)

    assert results == [200] * 20
    assert status == 0


# ---- outages ------------------------------------------------------------------------------


async def test_redis_down_gives_503_problems_then_recovers_without_restart(
    full_stack: FullStack,
) -> None:
    pids = [instance.proc.pid for instance in full_stack.instances if instance.proc]
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        phone = await create_phone(http, full_stack.direct_url, full_stack)
        _, auth = await create_customer(http, full_stack.direct_url, full_stack)
        await asyncio.to_thread(full_stack.stop_redis)

        async with http.get(f"{full_stack.http_url}/phones/{phone['id']}") as response:
            assert response.status == 503
            await problem_of(response)
            assert int(response.headers["Retry-After"]) >= 1
        async with http.post(
            f"{full_stack.http_url}/orders",
            json={"items": [{"phone_id": phone["id"], "quantity": 1}]},
            headers=auth,
        ) as response:
            assert response.status == 503
            await problem_of(response)
        async with http.get(f"{full_stack.http_url}/readyz") as response:
            assert response.status == 503
            await problem_of(response)
        for base in full_stack.instance_urls:
            async with http.get(f"{base}/readyz") as response:
                assert response.status == 503
                await problem_of(response)

        await asyncio.to_thread(full_stack.start_redis)
        deadline = time.monotonic() + 60
        while True:
            async with http.get(f"{full_stack.http_url}/phones/{phone['id']}") as response:
                if response.status == 200:
                    assert (await response.json())["phone"]["id"] == phone["id"]
                    break
                await problem_of(response)
            assert time.monotonic() < deadline, "the stack did not recover"
            await asyncio.sleep(0.2)
        async with http.get(f"{full_stack.http_url}/readyz") as response:
            assert response.status == 200
    assert [instance.proc.pid for instance in full_stack.instances if instance.proc] == pids
