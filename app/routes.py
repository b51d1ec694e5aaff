"""Every route of the service, in one table that also feeds /openapi.json."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler

from app import health, pages
from app.admin import handlers as admin
from app.admin import mail as admin_mail
from app.customers import handlers as customers
from app.customers.models import CustomerCreate, CustomerCreated, CustomerEnvelope, Deposit
from app.events import handlers as events
from app.ids import ID_PATTERN
from app.orders import handlers as orders
from app.orders.models import OrderCreate, OrderEnvelope, OrderPage
from app.phones import handlers as phones
from app.phones.models import (
    PhoneCreate,
    PhoneEnvelope,
    PhonePage,
    PhoneUpdate,
    Restock,
    SeedPhoneCreate,
)


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    auth: str = "anyone"  # anyone | customer | admin | owner-or-admin
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
    alias_of: str | None = None  # seed paths: same operation, hidden from the spec's tags


ROUTES: list[Route] = [
    Route("GET", "/healthz", health.healthz, "Liveness"),
    Route("GET", "/readyz", health.readyz, "Readiness: Redis answers and the scripts are loaded"),
    Route(
        "GET",
        "/phones",
        phones.list_phones,
        "List phones in creation order",
        answer=PhonePage,
        query=("page", "per_page"),
    ),
    Route(
        "POST",
        "/phones",
        phones.create_phone,
        "Create a phone",
        auth="admin",
        body=PhoneCreate,
        answer=PhoneEnvelope,
        status=201,
    ),
    Route(
        "POST",
        "/phones/create",
        phones.create_phone_seed,
        "Create a phone (seed alias: imageurl and price accepted)",
        auth="admin",
        body=SeedPhoneCreate,
        answer=PhoneEnvelope,
        status=201,
        alias_of="/phones",
    ),
    Route(
        "GET", "/phones/{id}", phones.get_phone, "One phone with its stock", answer=PhoneEnvelope
    ),
    Route(
        "PATCH",
        "/phones/{id}",
        phones.update_phone,
        "Change a phone's name, text or price",
        auth="admin",
        body=PhoneUpdate,
        answer=PhoneEnvelope,
    ),
    Route(
        "POST",
        "/phones/{id}/restock",
        phones.restock,
        "Add stock",
        auth="admin",
        body=Restock,
        answer=PhoneEnvelope,
        errors=(409,),
    ),
    Route(
        "POST",
        "/customers",
        customers.create_customer,
        "Create a customer; the token is shown once",
        auth="admin",
        body=CustomerCreate,
        answer=CustomerCreated,
        status=201,
        errors=(409,),
    ),
    Route(
        "GET",
        "/customers/{id}",
        customers.get_customer,
        "One customer",
        auth="owner-or-admin",
        answer=CustomerEnvelope,
    ),
    Route(
        "POST",
        "/customers/{id}/deposit",
        customers.deposit,
        "Add money to a balance",
        auth="admin",
        body=Deposit,
        answer=CustomerEnvelope,
        errors=(409,),
    ),
    Route(
        "POST",
        "/orders",
        orders.place_order,
        "Place an order",
        auth="customer",
        body=OrderCreate,
        answer=OrderEnvelope,
        status=201,
        idempotent_key=True,
    ),
    Route(
        "POST",
        "/orders/create",
        orders.place_order,
        "Place an order (seed alias)",
        auth="customer",
        body=OrderCreate,
        answer=OrderEnvelope,
        status=201,
        idempotent_key=True,
        alias_of="/orders",
    ),
    Route(
        "GET",
        "/orders",
        orders.list_orders,
        "List orders, newest first",
        auth="customer",
        answer=OrderPage,
        query=("page", "per_page", "status", "customer_id"),
    ),
    Route(
        "GET",
        "/orders/{id}",
        orders.get_order,
        "One order",
        auth="owner-or-admin",
        answer=OrderEnvelope,
    ),
    Route(
        "POST",
        "/orders/{id}/check",
        orders.check_order,
        "Complete an open order",
        auth="owner-or-admin",
        answer=OrderEnvelope,
        errors=(409,),
    ),
    Route(
        "POST",
        "/orders/check/{id}",
        orders.check_order,
        "Complete an open order (seed alias)",
        auth="owner-or-admin",
        answer=OrderEnvelope,
        alias_of="/orders/{id}/check",
        errors=(409,),
    ),
    Route(
        "POST",
        "/phones/check/{id}",
        orders.check_order,
        "Complete an open order (the seed README's path)",
        auth="owner-or-admin",
        answer=OrderEnvelope,
        alias_of="/orders/{id}/check",
        errors=(409,),
    ),
    Route(
        "POST",
        "/orders/{id}/cancel",
        orders.cancel_order,
        "Cancel an open order: refund and restock",
        auth="owner-or-admin",
        answer=OrderEnvelope,
        errors=(409,),
    ),
    Route(
        "GET",
        "/admin/audit",
        admin.audit,
        "Conservation audit of stock and money",
        auth="admin",
        answer=dict,
    ),
    Route(
        "GET",
        "/admin/mail/dead",
        admin_mail.get_dead_letters,
        "Dead-lettered confirmation mails, newest first",
        auth="admin",
        answer=admin_mail.DeadLetterPage,
        query=("page", "per_page"),
    ),
    Route(
        "POST",
        "/admin/mail/dead/{id}/retry",
        admin_mail.retry_dead_letter,
        "Requeue a dead-lettered confirmation mail",
        auth="admin",
        answer=admin_mail.RequeuedEnvelope,
        errors=(422,),
        id_pattern=r"^[0-9]{1,20}-[0-9]{1,20}$",
    ),
]

BENCH_ROUTES: list[Route] = [
    Route("GET", "/bench/hello", health.bench_hello, "Bench ceiling: minimal JSON"),
    Route("GET", "/bench/sleep", health.bench_sleep, "Bench: a slow request", query=("ms",)),
]


# Served, but left out of /openapi.json: OpenAPI cannot describe a WebSocket
# upgrade, and /live and /docs are HTML pages. See app/events/__init__.py for the protocol.
SPECLESS_ROUTES: list[Route] = [
    Route(
        "GET",
        "/orders/events",
        events.orders_events,
        "Live order events over a WebSocket (resume with ?last_id=)",
        auth="customer",
        status=101,
        query=("last_id",),
    ),
    Route("GET", "/live", pages.live_page, "A page showing your orders change state live"),
    Route("GET", "/docs", pages.docs_page, "API docs: Swagger UI over /openapi.json"),
    Route(
        "GET",
        "/docs/{id}",
        pages.docs_asset,
        "Swagger UI's files, from the swagger-ui-bundle-v2 package",
        id_pattern=pages.DOCS_ASSET_PATTERN,
    ),
]


def add_routes(app: web.Application, routes: list[Route]) -> None:
    for route in routes:
        path = route.path.replace("{id}", "{id:" + route.id_pattern.strip("^$") + "}")
        app.router.add_route(route.method, path, route.handler)


def route_table(bench: bool) -> list[Route]:
    return ROUTES + (BENCH_ROUTES if bench else [])
