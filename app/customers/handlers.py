"""Thin HTTP handlers of customers."""

from __future__ import annotations

from aiohttp import web

from app.auth import authenticate, check_owner_or_admin, require_admin
from app.customers import service
from app.customers.models import CustomerCreate, CustomerCreated, CustomerEnvelope, Deposit
from app.handlers import path_id, redis_of, scripts_of
from app.models import decode_body, json_response


async def create_customer(request: web.Request) -> web.Response:
    await require_admin(request)
    data = await decode_body(request, CustomerCreate)
    customer, token = await service.create_customer(scripts_of(request), data)
    return json_response(CustomerCreated(customer=customer, token=token), status=201)


async def get_customer(request: web.Request) -> web.Response:
    principal = await authenticate(request)
    customer_id = path_id(request)
    check_owner_or_admin(principal, customer_id, "customer_not_found")
    customer = await service.get_customer(redis_of(request), customer_id)
    return json_response(CustomerEnvelope(customer=customer))


async def deposit(request: web.Request) -> web.Response:
    await require_admin(request)
    customer_id = path_id(request)
    data = await decode_body(request, Deposit)
    customer = await service.deposit(scripts_of(request), customer_id, data.amount_cents)
    return json_response(CustomerEnvelope(customer=customer))
