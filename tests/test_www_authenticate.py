"""Issue 18 item 2: every 401 carries ``WWW-Authenticate: Bearer realm="phoneshop"``
(RFC 9110 section 11.6.1), with ``error="invalid_token"`` once a bearer token was
sent (RFC 6750 section 3.1), on every route that needs a token, on the WebSocket
upgrade refusal, and through nginx on every port."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from app.ids import ID_PATTERN, new_id
from app.routes import SPECLESS_ROUTES, Route, route_table
from loadtests.support.stack import FullStack
from tests.helpers import UPGRADE, Shop

PROBLEM = "application/problem+json"
NO_TOKEN = 'Bearer realm="phoneshop"'
BAD_TOKEN = 'Bearer realm="phoneshop", error="invalid_token"'

PROTECTED = [
    route
    for route in route_table(bench=True) + SPECLESS_ROUTES
    if route.auth != "anyone" and route.status != 101
]


def example_path(route: Route) -> str:
    if route.id_pattern == ID_PATTERN:
        return route.path.replace("{id}", new_id())
    return route.path.replace("{id}", "5.1-0")  # a dead letter's id: partition, stream id


async def assert_challenge(response: aiohttp.ClientResponse, expected: str) -> None:
    assert response.status == 401
    assert response.headers.getall("WWW-Authenticate") == [expected]
    problem = await response.json(content_type=PROBLEM)
    assert problem["code"] == "unauthorized"
    # What to send, for a client that never sent a token (the seed's clients).
    assert "Authorization: Bearer <token>" in problem["detail"]


def test_every_token_route_is_covered() -> None:
    assert len(PROTECTED) >= 15
    assert {route.auth for route in PROTECTED} == {"customer", "admin", "owner-or-admin"}


@pytest.mark.parametrize("route", PROTECTED, ids=lambda r: f"{r.method} {r.path}")
async def test_every_401_names_the_scheme_and_realm(client: TestClient, route: Route) -> None:
    path = example_path(route)
    body = {"json": {}} if route.body is not None else {}
    cases = [
        ({}, NO_TOKEN),
        # Another scheme is no bearer token: only the challenge, no error code.
        ({"Authorization": "Basic YWRtaW46YWRtaW4="}, NO_TOKEN),
        ({"Authorization": "Bearer not-a-known-token"}, BAD_TOKEN),
        ({"Authorization": "bearer not-a-known-token"}, BAD_TOKEN),
        ({"Authorization": "Bearer bad token with spaces"}, BAD_TOKEN),
        ({"Authorization": "Bearer"}, BAD_TOKEN),
    ]
    for headers, expected in cases:
        response = await client.request(route.method, path, headers=headers, **body)
        await assert_challenge(response, expected)


async def test_metrics_401_from_elsewhere_carries_the_challenge(client: TestClient) -> None:
    remote = {"X-Forwarded-For": "203.0.113.9"}
    await assert_challenge(await client.get("/metrics", headers=remote), NO_TOKEN)
    refused = await client.get("/metrics", headers={**remote, "Authorization": "Bearer nope"})
    await assert_challenge(refused, BAD_TOKEN)


async def test_a_valid_token_gets_no_challenge(shop: Shop) -> None:
    _, auth = await shop.customer()
    response = await shop.client.get("/orders", headers=auth)
    assert response.status == 200
    assert "WWW-Authenticate" not in response.headers
    forbidden = await shop.client.post("/phones", json={}, headers=auth)
    assert forbidden.status == 403
    assert "WWW-Authenticate" not in forbidden.headers


async def test_websocket_upgrade_refusal_carries_the_challenge(client: TestClient) -> None:
    cases = [
        ({}, NO_TOKEN),
        ({"Sec-WebSocket-Protocol": "bearer"}, NO_TOKEN),
        ({"Sec-WebSocket-Protocol": "chat, superchat"}, NO_TOKEN),
        ({"Sec-WebSocket-Protocol": "bearer, not-a-token"}, BAD_TOKEN),
        ({"Authorization": "Bearer not-a-token"}, BAD_TOKEN),
    ]
    for headers, expected in cases:
        response = await client.get("/orders/events", headers={**UPGRADE, **headers})
        await assert_challenge(response, expected)


async def test_the_challenge_passes_nginx_on_every_port(full_stack: FullStack) -> None:
    async with aiohttp.ClientSession() as http:
        for base, path in (
            (full_stack.http_url, "/orders"),
            (full_stack.seed_orders_url, "/orders"),
            (full_stack.seed_phones_url, "/phones/create"),
        ):
            method = "POST" if path.endswith("create") else "GET"
            await assert_challenge(await http.request(method, base + path), NO_TOKEN)
            bad = await http.request(
                method, base + path, headers={"Authorization": "Bearer not-a-token"}
            )
            await assert_challenge(bad, BAD_TOKEN)
        for base in (full_stack.http_url, full_stack.seed_orders_url):
            refused = await http.get(f"{base}/orders/events", headers=UPGRADE)
            await assert_challenge(refused, NO_TOKEN)
