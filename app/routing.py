"""What a route entry is, and the wrapper that makes the entry true.

A ``Route`` in app/routes.py declares who may call it (``auth``), the body it
takes (``body``), whether it reads an Idempotency-Key, and the other paths it
is also served on (``aliases``). ``add_routes`` registers each path with a
wrapper built from the entry, which, in this order:

1. answers 401 without a valid token, and 403 to a customer on an admin route,
   before the handler runs (the handler cannot forget it);
2. reads and checks the Idempotency-Key header when the route declares one;
3. decodes the body into the declared model (415, 400 or 422 otherwise);

and only then calls the handler with a ``Call``: the request, the principal
and the decoded body. The same entries feed /openapi.json (app/openapi.py).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
from aiohttp import web

from app.auth import Principal, authenticate, authenticate_websocket, check_admin
from app.fields import IDEMPOTENCY_KEY_PATTERN
from app.ids import ID_PATTERN
from app.json_body import decode_body
from app.problems import ProblemError

Body = TypeVar("Body")

AUTHS = ("anyone", "customer", "admin", "owner-or-admin")

_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)


class Call(msgspec.Struct, Generic[Body], frozen=True):
    """What a handler receives: the request, and what its route entry checked. A Struct,
    not a frozen dataclass: one per request, made in a sixth of the time (P1)."""

    request: web.Request
    body: Body
    idempotency_key: str | None
    _principal: Principal | None

    @property
    def principal(self) -> Principal:
        """Who is calling; only routes that need a token have one."""
        if self._principal is None:
            raise RuntimeError(f"{self.request.path}: its route takes no token (auth='anyone')")
        return self._principal

    @property
    def id(self) -> str:
        """The path's id; the route's pattern already checked it, so nothing
        else can reach a key name."""
        return self.request.match_info["id"]


RouteHandler = Callable[[Call[Any]], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Alias:
    """Another path serving the same operation (the seed's paths).

    ``body``: a model of its own the alias accepts instead of the route's, and
    ``to_body`` turns what it decoded into the route's body model."""

    path: str
    summary: str
    body: type | None = None
    to_body: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: RouteHandler
    summary: str
    auth: str = "anyone"  # anyone | customer | admin | owner-or-admin (AUTHS)
    body: type | None = None
    answer: type | None = None
    status: int = 200
    query: tuple[str, ...] = ()
    idempotent_key: bool = False
    # Error statuses the operation itself decides (auth, body and query errors
    # are added by openapi.py from the other fields).
    errors: tuple[int, ...] = ()
    # What {id} must look like: anything else does not match the route, so
    # /phones/create is never read as the phone "create".
    id_pattern: str = ID_PATTERN
    aliases: tuple[Alias, ...] = ()
    # A WebSocket upgrade: browsers offer the token as a subprotocol.
    websocket: bool = False
    # Set on the entries ``expand`` derives from ``aliases``: the path they alias.
    alias_of: str | None = None
    to_body: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        if self.auth not in AUTHS:
            raise ValueError(f"{self.method} {self.path}: auth must be one of {AUTHS}")


def expand(routes: list[Route]) -> list[Route]:
    """Every path served: each route, followed by one entry per alias (each
    entry with no aliases left, so expanding twice changes nothing)."""
    served: list[Route] = []
    for route in routes:
        served.append(dataclasses.replace(route, aliases=()) if route.aliases else route)
        for alias in route.aliases:
            served.append(
                dataclasses.replace(
                    route,
                    path=alias.path,
                    summary=alias.summary,
                    body=alias.body or route.body,
                    to_body=alias.to_body,
                    aliases=(),
                    alias_of=route.path,
                )
            )
    return served


def enforcing(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler of one entry: its checks, then its handler."""
    handler, auth, model, to_body = route.handler, route.auth, route.body, route.to_body
    reads_key = route.idempotent_key
    who = authenticate_websocket if route.websocket else authenticate

    async def serve(request: web.Request) -> web.StreamResponse:
        principal = None
        if auth != "anyone":
            principal = await who(request)
            if auth == "admin":
                check_admin(principal)
        key = idempotency_key(request) if reads_key else None
        body = None
        if model is not None:
            body = await decode_body(request, model)
            if to_body is not None:
                body = to_body(body)
        return await handler(Call(request, body, key, principal))

    serve.__name__ = serve.__qualname__ = getattr(handler, "__name__", "serve")
    return serve


def idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ProblemError(
            "invalid_idempotency_key", "Idempotency-Key must be 1 to 255 printable ASCII characters"
        )
    return key


def add_routes(app: web.Application, routes: list[Route]) -> None:
    for route in expand(routes):
        path = route.path.replace("{id}", "{id:" + route.id_pattern.strip("^$") + "}")
        app.router.add_route(route.method, path, enforcing(route))
