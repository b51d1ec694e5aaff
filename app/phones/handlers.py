"""Thin HTTP handlers of the phone catalogue: call one service function, answer.

Who may call each, and the body it takes, are the route's (app/routes.py)."""

from __future__ import annotations

from aiohttp import web

from app import appkeys
from app.handlers import gateway_of, scripts_of
from app.phones import service
from app.phones.models import PhoneCreate, PhoneEnvelope, PhonePage, PhoneUpdate, Restock
from app.query import page_params
from app.responses import json_response
from app.routing import Call
from app.seed import phone_for


async def create_phone(call: Call[PhoneCreate]) -> web.Response:
    request = call.request
    phone = await service.create_phone(scripts_of(request), call.body)
    return json_response(PhoneEnvelope(phone=phone_for(request, phone)), status=201)


async def list_phones(call: Call[None]) -> web.Response:
    request = call.request
    page = page_params(request)
    pages = request.app[appkeys.CATALOGUE_PAGES]
    total, phones = await service.list_phones(gateway_of(request), pages, page)
    phones = [phone_for(request, phone) for phone in phones]
    return json_response(PhonePage(phones=phones, **page.counts(total)))


async def get_phone(call: Call[None]) -> web.Response:
    phone = await service.get_phone(gateway_of(call.request), call.id)
    return json_response(PhoneEnvelope(phone=phone_for(call.request, phone)))


async def update_phone(call: Call[PhoneUpdate]) -> web.Response:
    phone = await service.update_phone(scripts_of(call.request), call.id, call.body)
    return json_response(PhoneEnvelope(phone=phone_for(call.request, phone)))


async def restock(call: Call[Restock]) -> web.Response:
    phone = await service.restock(
        scripts_of(call.request),
        call.id,
        call.body.quantity,
        on_striped=call.request.app[appkeys.REFILLER].stripe_everywhere,
    )
    return json_response(PhoneEnvelope(phone=phone_for(call.request, phone)))
