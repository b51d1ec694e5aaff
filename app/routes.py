"""Every route of the service, in one table: what it serves, who may call it,
the body it takes, its seed aliases. app/routing.py makes each entry true when
it registers it; app/openapi.py publishes the same entries as /openapi.json."""

from __future__ import annotations

from app import health, pages
from app.admin import handlers as admin
from app.admin import mail as admin_mail
from app.customers import handlers as customers
from app.customers.models import CustomerCreate, CustomerCreated, CustomerEnvelope, Deposit
from app.events import handlers as events
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
from app.routing import Alias, Route, expand
from app.vocabulary import PARTITION_ENTRY_ID_PATTERN

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
        aliases=(
            Alias(
                "/phones/create",
                "Create a phone (seed alias: imageurl and price accepted)",
                body=SeedPhoneCreate,
                to_body=SeedPhoneCreate.to_create,
            ),
        ),
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
        aliases=(Alias("/orders/create", "Place an order (seed alias)"),),
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
        aliases=(
            Alias("/orders/check/{id}", "Complete an open order (seed alias)"),
            Alias("/phones/check/{id}", "Complete an open order (the seed README's path)"),
        ),
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
        id_pattern=PARTITION_ENTRY_ID_PATTERN,
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
        websocket=True,
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


def route_table(bench: bool) -> list[Route]:
    """Every path served and published: each route and, after it, its aliases."""
    return expand(ROUTES + (BENCH_ROUTES if bench else []))
