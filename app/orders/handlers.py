"""Thin HTTP handlers of orders.

Who may call each, the body it takes and the Idempotency-Key are the route's
(app/routes.py)."""

from __future__ import annotations

import functools

from aiohttp import web

from app import appkeys
from app.handlers import gateway_of, scripts_of
from app.ids import is_valid_id
from app.middlewares import REQUEST_ID
from app.orders import grants, saga_service, service
from app.orders.models import OrderCreate, OrderEnvelope, OrderPage
from app.problems import ProblemError
from app.query import page_params
from app.responses import json_response
from app.routing import Call
from app.seed import order_for
from app.vocabulary import ORDER_STATUSES


async def place_order(call: Call[OrderCreate]) -> web.Response:
    request, principal, data = call.request, call.principal, call.body
    on_behalf_of = data.for_customer()
    if principal.is_admin:
        if on_behalf_of is None:
            raise ProblemError(
                "validation_error", "The admin must name the customer_id to order for"
            )
        customer_id = on_behalf_of
    else:
        if on_behalf_of is not None and on_behalf_of != principal.customer_id:
            raise ProblemError("forbidden", "A customer may only order for themselves")
        customer_id = principal.customer_id
    placed = await request.app[appkeys.PLACE_ORDER](
        customer_id=customer_id,
        lines=data.lines(),
        autocheck=data.autocheck,
        idempotency_key=call.idempotency_key,
        request_id=request[REQUEST_ID],
    )
    headers = {"Location": f"/orders/{placed.order.id}"}
    if placed.replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(
        OrderEnvelope(order=order_for(request, placed.order)), status=201, headers=headers
    )


async def bind_order_path(app: web.Application) -> None:
    """on_startup, after observe.instrument (which wraps the scripts): the order path's
    arguments that are the app's, bound once (app/orders/saga_service.py: PlaceOrder).
    Escrow's striping rule is sent only with ESCROW_STRIPES; the refiller hears of a
    striped phone only then."""
    settings = app[appkeys.SETTINGS]
    app[appkeys.PLACE_ORDER] = functools.partial(
        saga_service.place_order,
        app[appkeys.SCRIPTS],
        app[appkeys.SETTLER].settle_soon,
        idempotency_ttl=settings.idempotency_ttl_seconds,
        reservation_ttl_ms=settings.reservation_ttl_ms,
        fault_point=settings.saga_fault_point,
        always_split=settings.saga_always_split,
        striping_rule=grants.STRIPING_RULE if settings.escrow_stripes else "",
        on_striped=app[appkeys.REFILLER].stripe_everywhere,
    )


async def list_orders(call: Call[None]) -> web.Response:
    request, principal = call.request, call.principal
    page = page_params(request)
    status = request.query.get("status")
    if status is not None and status not in ORDER_STATUSES:
        raise ProblemError("validation_error", f"status must be one of {', '.join(ORDER_STATUSES)}")
    customer_id = request.query.get("customer_id")
    if customer_id is not None and not is_valid_id(customer_id):
        raise ProblemError("validation_error", "customer_id is not a valid id")
    if not principal.is_admin:
        if customer_id not in (None, principal.customer_id):
            raise ProblemError("forbidden", "A customer may only list their own orders")
        customer_id = principal.customer_id
    total, orders = await service.list_orders(
        gateway_of(request), page, customer_id=customer_id, status=status
    )
    orders = [order_for(request, order) for order in orders]
    return json_response(OrderPage(orders=orders, **page.counts(total)))


async def get_order(call: Call[None]) -> web.Response:
    order = await service.get_order(gateway_of(call.request), call.principal, call.id)
    return json_response(OrderEnvelope(order=order_for(call.request, order)))


async def _change_status(call: Call[None], change: service.StatusChange) -> web.Response:
    request = call.request
    order = await change(
        gateway_of(request), scripts_of(request), call.principal, call.id, request[REQUEST_ID]
    )
    return json_response(OrderEnvelope(order=order_for(request, order)))


async def check_order(call: Call[None]) -> web.Response:
    return await _change_status(call, service.check_order)


async def cancel_order(call: Call[None]) -> web.Response:
    settings = call.request.app[appkeys.SETTINGS]
    cancel = functools.partial(
        saga_service.cancel_order,
        take_back_after_ms=settings.reservation_ttl_ms,
        fault_point=settings.saga_fault_point,
        always_split=settings.saga_always_split,
    )
    return await _change_status(call, cancel)
