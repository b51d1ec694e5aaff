"""/openapi.json, generated from the route table and the same msgspec Structs
that validate requests, so the spec cannot drift from the code."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from app import appkeys
from app.models import IDEMPOTENCY_KEY_PATTERN, QUERY_SCHEMAS, json_response
from app.problems import PROBLEMS
from app.routes import Route, route_table

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
    if route.alias_of is not None:
        operation["description"] = f"Alias of {route.alias_of}, kept for the seed's clients."
    return operation


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
    # field) are added to its schema here, so the spec states them too.
    for model in models:
        extra = dict(getattr(model, "__openapi_extra__", {}))
        properties = extra.pop("properties", {})
        components[model.__name__].update(extra)
        components[model.__name__].get("properties", {}).update(properties)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, schemas)
    return {
        "openapi": "3.1.0",
        "info": {"title": "PhoneShop", "version": "0.1.0"},
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
