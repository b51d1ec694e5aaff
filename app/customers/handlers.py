"""Thin HTTP handlers of customers.

Who may call each, and the body it takes, are the route's (app/routes.py)."""

from __future__ import annotations

from aiohttp import web

from app.auth import check_owner_or_admin
from app.customers import service
from app.customers.models import CustomerCreate, CustomerCreated, CustomerEnvelope, Deposit
from app.handlers import gateway_of, scripts_of
from app.responses import json_response
from app.routing import Call


async def create_customer(call: Call[CustomerCreate]) -> web.Response:
    customer, token = await service.create_customer(scripts_of(call.request), call.body)
    return json_response(CustomerCreated(customer=customer, token=token), status=201)


async def get_customer(call: Call[None]) -> web.Response:
    customer_id = call.id
    check_owner_or_admin(call.principal, customer_id, "customer_not_found")
    customer = await service.get_customer(gateway_of(call.request), customer_id)
    return json_response(CustomerEnvelope(customer=customer))


async def deposit(call: Call[Deposit]) -> web.Response:
    customer = await service.deposit(scripts_of(call.request), call.id, call.body.amount_cents)
    return json_response(CustomerEnvelope(customer=customer))
