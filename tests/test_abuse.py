"""Abuse: slow clients, oversized bodies, and what must never leak.

Through the session's real stack (nginx in front of two instances).
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid

import aiohttp
from redis.asyncio import Redis

from tests.stack import FullStack

SLOW_CONNECTIONS = 300


def post(stack: FullStack, path: str, body: dict, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(
        stack.direct_url + path,
        data=json.dumps(body).encode(),
        headers={**headers, "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def new_customer(stack: FullStack) -> tuple[str, str]:
    status, body = post(
        stack,
        "/customers",
        {
            "name": "Mal",
            "surname": "Lory",
            "email": f"{uuid.uuid4().hex}@example.com",
            "balance_cents": 10_000,
        },
        stack.admin_headers,
    )
    assert status == 201
    return body["customer"]["id"], body["token"]


async def test_slow_header_senders_do_not_starve_normal_clients(full_stack: FullStack) -> None:
    port = full_stack.nginx.config.http_port
    writers: list[asyncio.StreamWriter] = []
    for _ in range(SLOW_CONNECTIONS):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /phones HTTP/1.1\r\nHost: x\r\n")
        writers.append(writer)

    async def trickle() -> None:
        # One header byte per connection every half second: a slowloris.
        for _ in range(6):
            for writer in writers:
                if not writer.is_closing():
                    writer.write(b"X")
            await asyncio.sleep(0.5)

    dripping = asyncio.create_task(trickle())
    statuses = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for _ in range(40):
            async with session.get(f"{full_stack.http_url}/phones?page=1") as response:
                statuses.append(response.status)
    await dripping
    for writer in writers:
        writer.close()
    print(f"\n{SLOW_CONNECTIONS} slow header senders open; 40 normal requests: {set(statuses)}")
    assert statuses == [200] * 40


async def test_oversized_body_is_413_problem_through_nginx(full_stack: FullStack) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{full_stack.http_url}/orders",
            data=b"{" + b" " * 100_000 + b"}",
            headers={"Content-Type": "application/json", "Authorization": "Bearer x"},
        ) as response,
    ):
        assert response.status == 413
        assert response.content_type == "application/problem+json"
        assert (await response.json(content_type=None))["code"] == "payload_too_large"


async def test_customers_cannot_reach_admin_or_others(full_stack: FullStack) -> None:
    _, token = new_customer(full_stack)
    other_id, _ = new_customer(full_stack)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:
        for path in ("/admin/audit", "/admin/mail/dead"):
            async with session.get(f"{full_stack.http_url}{path}", headers=headers) as response:
                assert response.status == 403, path
        async with session.get(
            f"{full_stack.http_url}/customers/{other_id}", headers=headers
        ) as response:
            assert response.status == 404


async def test_tokens_are_stored_hashed_and_never_logged(full_stack: FullStack) -> None:
    customer_id, token = new_customer(full_stack)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:
        # Requests that carry both tokens, good and bad, through nginx.
        for url in (f"/customers/{customer_id}", "/admin/audit", "/orders?page=1"):
            for auth in (headers, full_stack.admin_headers, {"Authorization": f"Bearer {token}x"}):
                async with session.get(f"{full_stack.http_url}{url}", headers=auth) as response:
                    await response.read()
    redis = Redis.from_url(full_stack.redis.url)
    try:
        everything = b"".join(
            [key + repr(await redis.dump(key)).encode() for key in await redis.keys("*")]
        )
    finally:
        await redis.aclose()
    assert token.encode() not in everything
    assert full_stack.admin_token.encode() not in everything
    logs = [full_stack.nginx.access_log, full_stack.nginx.error_log] + [
        instance.log_path for instance in full_stack.instances
    ]
    checked = 0
    for path in logs:
        if path.exists():
            text = path.read_text(errors="replace")
            checked += len(text)
            assert token not in text, path
            assert full_stack.admin_token not in text, path
    assert checked > 0
