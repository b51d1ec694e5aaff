"""/openapi.json, generated from the route table and the same msgspec Structs
that validate requests, so the spec cannot drift from the code."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from app import appkeys
from app.fields import IDEMPOTENCY_KEY_PATTERN
from app.orders.models import OrderEnvelope, OrderPage
from app.phones.models import PhoneEnvelope, PhonePage
from app.problems import PROBLEMS
from app.query import QUERY_SCHEMAS
from app.responses import json_response
from app.routes import route_table
from app.routing import Route

PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string", "enum": sorted(PROBLEMS)},
    },
}

_ERRORS_BY_AUTH = {
    "anyone": [],
    "customer": [401, 403],
    "admin": [401, 403],
    "owner-or-admin": [401],
}


def _operation(route: Route, schemas: dict[type, Any]) -> dict[str, Any]:
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    responses: dict[str, Any] = {}
    answer_schema = schemas.get(route.answer, {"type": "object"})
    responses[str(route.status)] = {
        "description": "Success",
        "content": {"application/json": {"schema": answer_schema}},
    }
    statuses = {429, 503} | set(_ERRORS_BY_AUTH[route.auth]) | set(route.errors)
    parameters: list[dict[str, Any]] = []
    if "{id}" in route.path:
        parameters.append(
            {
                "name": "id",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": route.id_pattern},
            }
        )
        statuses.add(404)
    for name in route.query:
        parameters.append(
            {"name": name, "in": "query", "required": False, "schema": QUERY_SCHEMAS[name]}
        )
        statuses.add(422)
    if route.idempotent_key:
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
            }
        )
        statuses |= {400, 402, 404, 409}
    if route.body is not None:
        statuses |= {400, 413, 415, 422, 409, 404}
    for status in sorted(statuses):
        responses[str(status)] = {"description": "Problem", "content": problem}
    operation: dict[str, Any] = {
        "summary": route.summary,
        "operationId": f"{route.method.lower()}{route.path.replace('/', '_').replace('{', '').replace('}', '')}",
        "responses": responses,
    }
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schemas[route.body]}},
        }
    if route.auth != "anyone":
        operation["security"] = [{"bearer": []}]
    notes = []
    if route.alias_of is not None:
        notes.append(f"Alias of {route.alias_of}, kept for the seed's clients.")
    seed_note = _seed_note(route)
    if seed_note is not None:
        notes.append(seed_note)
    if notes:
        operation["description"] = "\n\n".join(notes)
    return operation


def _structs(models: list[type]) -> list[type]:
    """Every Struct type the models are made of, themselves included."""
    found: dict[type, None] = {}

    def walk(info: msgspec.inspect.Type) -> None:
        if isinstance(info, msgspec.inspect.StructType):
            if info.cls not in found:
                found[info.cls] = None
                for field in info.fields:
                    walk(field.type)
        elif isinstance(info, msgspec.inspect.UnionType):
            for member in info.types:
                walk(member)
        elif isinstance(info, msgspec.inspect.Metadata):
            walk(info.type)
        elif isinstance(info, msgspec.inspect.CollectionType):
            walk(info.item_type)

    for info in msgspec.inspect.multi_type_info(models):
        walk(info)
    return list(found)


def seed_services(path: str) -> list[str]:
    """The seed ports nginx also serves this path on (nginx/render.py's seed
    servers: /phones and /phones/... on the phones port; /orders, /orders/...
    and /phones/check/... on the orders port; the probes on both)."""
    services = []
    probe = path in ("/healthz", "/readyz")  # every listener answers them
    if probe or path == "/phones" or path.startswith("/phones/"):
        services.append("SEED_PHONES_PORT (5555)")
    if probe or path == "/orders" or path.startswith(("/orders/", "/phones/check/")):
        services.append("SEED_ORDERS_PORT (7777)")
    return services


def _seed_note(route: Route) -> str | None:
    ports = seed_services(route.path)
    if not ports:
        return None
    note = f"Also served on the seed's {' and '.join(ports)}, where "
    if route.answer in (PhoneEnvelope, PhonePage):
        note += (
            "each phone also carries the seed's field names: `imageurl` (= `image_url`) and "
            "`price`, a currency amount (= `price_cents` / 100)."
        )
    elif route.answer in (OrderEnvelope, OrderPage):
        note += "each order line also carries the seed's `price`, its unit price as an amount."
    else:
        note += "the answer is the same."
    if route.auth != "anyone":
        note += (
            " The seed had no authentication; here send `Authorization: Bearer <token>` "
            "(the 401 says so in WWW-Authenticate and its detail)."
        )
    return note


def build_spec(routes: list[Route]) -> dict[str, Any]:
    models = sorted(
        {
            model
            for route in routes
            for model in (route.body, route.answer)
            if model not in (None, dict)
        },
        key=lambda model: model.__name__,
    )
    refs, components = msgspec.json.schema_components(
        models, ref_template="#/components/schemas/{name}"
    )
    schemas = dict(zip(models, refs, strict=True))
    # Rules a Struct checks in __post_init__ (one of two fields, at least one
    # field) and fields it describes itself are added to its schema here, so
    # the spec states them too: for every Struct, nested ones included.
    for model in _structs(models):
        extra = dict(getattr(model, "__openapi_extra__", {}))
        properties = extra.pop("properties", {})
        components[model.__name__].update(extra)
        components[model.__name__].get("properties", {}).update(properties)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "PhoneShop",
            "version": "0.1.0",
            "description": "Phones, customers and orders; money in integer cents. "
            "Browse this document at [/docs](/docs); watch your orders change state "
            "live at [/live](/live) (over the WebSocket `GET /orders/events`).",
        },
        # Relative: resolved against wherever the document was fetched from, so
        # generated clients and Swagger UI call the host (and port) that served
        # it, behind any proxy or name.
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": {**components, "Problem": PROBLEM_SCHEMA},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


async def openapi_json(request: web.Request) -> web.Response:
    settings = request.app[appkeys.SETTINGS]
    return json_response(build_spec(route_table(settings.bench_routes)))
