"""The route table enforces what it declares (app/routing.py): auth, body and
Idempotency-Key are checked before any handler runs, so a handler that forgets
cannot serve the wrong caller; seed aliases are declared once, on their route."""

from __future__ import annotations

import ast
import inspect
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from app.main import build_app
from app.responses import json_response
from app.routes import ROUTES, SPECLESS_ROUTES, route_table
from app.routing import Call, Route, add_routes
from app.settings import Settings
from tests.helpers import ADMIN, Shop

PROBLEM = "application/problem+json"


class Note(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: str


async def _client_with(aiohttp_client: Any, routes: list[Route]) -> TestClient:
    """The app as create_app makes it, plus ``routes``."""
    app = build_app(Settings.from_env())
    add_routes(app, routes)
    return await aiohttp_client(app)


def _recording(calls: list[Call]) -> Any:
    async def careless_handler(call: Call[Any]) -> web.Response:
        # Checks nothing itself: whatever reaches it, the route let through.
        calls.append(call)
        return json_response({"served": True})

    return careless_handler


async def test_an_admin_route_never_serves_a_customer_even_if_its_handler_forgets(
    aiohttp_client: Any, app_env: dict[str, str], redis: Redis
) -> None:
    calls: list[Call] = []
    route = Route("POST", "/test/admin-only", _recording(calls), "Test", auth="admin", body=Note)
    client = await _client_with(aiohttp_client, [route])
    _, customer = await Shop(client).customer()

    refused = await client.post("/test/admin-only", json={"text": "hi"}, headers=customer)
    assert refused.status == 403
    assert (await refused.json(content_type=PROBLEM))["code"] == "forbidden"
    anonymous = await client.post("/test/admin-only", json={"text": "hi"})
    assert anonymous.status == 401
    assert anonymous.headers["WWW-Authenticate"] == 'Bearer realm="phoneshop"'
    assert calls == []  # neither reached the handler

    served = await client.post("/test/admin-only", json={"text": "hi"}, headers=ADMIN)
    assert served.status == 200
    assert [(call.principal.is_admin, call.body) for call in calls] == [(True, Note(text="hi"))]


async def test_the_handler_gets_the_principal_and_the_decoded_body_or_is_not_called(
    aiohttp_client: Any, app_env: dict[str, str], redis: Redis
) -> None:
    calls: list[Call] = []
    route = Route(
        "POST",
        "/test/notes",
        _recording(calls),
        "Test",
        auth="customer",
        body=Note,
        idempotent_key=True,
    )
    client = await _client_with(aiohttp_client, [route])
    customer, auth = await Shop(client).customer()

    for body, headers, status, code in (
        ({"text": 1}, auth, 422, "validation_error"),
        ({"text": "x", "extra": 1}, auth, 422, "validation_error"),
        ({"text": "x"}, {**auth, "Idempotency-Key": "k" * 256}, 400, "invalid_idempotency_key"),
    ):
        response = await client.post("/test/notes", json=body, headers=headers)
        assert response.status == status, body
        assert (await response.json(content_type=PROBLEM))["code"] == code
    malformed = await client.post(
        "/test/notes", data=b"{", headers={**auth, "Content-Type": "application/json"}
    )
    assert malformed.status == 400
    assert calls == []

    ok = await client.post(
        "/test/notes", json={"text": "x"}, headers={**auth, "Idempotency-Key": "k1"}
    )
    assert ok.status == 200
    [call] = calls
    assert call.principal.customer_id == customer["id"]
    assert (call.body, call.idempotency_key) == (Note(text="x"), "k1")


def test_seed_aliases_are_declared_on_their_route_and_served_with_its_rules() -> None:
    declared = {(route.method, route.path) for route in ROUTES}
    served = route_table(bench=False)
    aliases = [route for route in served if route.alias_of is not None]
    assert {(route.method, route.path) for route in aliases} == {
        ("POST", "/phones/create"),
        ("POST", "/orders/create"),
        ("POST", "/orders/check/{id}"),
        ("POST", "/phones/check/{id}"),
    }
    for alias in aliases:
        assert (alias.method, alias.path) not in declared  # no copy of the route in the table
        [original] = [r for r in ROUTES if (r.method, r.path) == (alias.method, alias.alias_of)]
        assert (alias.handler, alias.auth, alias.answer, alias.status, alias.errors) == (
            original.handler,
            original.auth,
            original.answer,
            original.status,
            original.errors,
        )


_CHECKS_OF_THE_TABLE = {"authenticate", "authenticate_websocket", "require_admin", "decode_body"}


def test_no_routed_handler_checks_auth_or_decodes_its_body_by_hand() -> None:
    """The table is the one place: a handler module that called these would
    state a second time what its route declares."""
    modules = {inspect.getmodule(r.handler) for r in route_table(bench=True) + SPECLESS_ROUTES}
    assert len(modules) >= 7
    for module in modules:
        tree = ast.parse(inspect.getsource(module))
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        used |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert not used & _CHECKS_OF_THE_TABLE, (module.__name__, used & _CHECKS_OF_THE_TABLE)
