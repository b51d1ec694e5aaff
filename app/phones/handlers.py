"""Thin HTTP handlers of the phone catalogue: parse, call one service function, answer."""

from __future__ import annotations

from aiohttp import web

from app.auth import require_admin
from app.handlers import path_id, redis_of, scripts_of
from app.models import decode_body, json_response, page_params
from app.phones import service
from app.phones.models import (
    PhoneCreate,
    PhoneEnvelope,
    PhonePage,
    PhoneUpdate,
    Restock,
    SeedPhoneCreate,
)
from app.seed import phone_for


async def create_phone(request: web.Request) -> web.Response:
    await require_admin(request)
    data = await decode_body(request, PhoneCreate)
    phone = await service.create_phone(scripts_of(request), data)
    return json_response(PhoneEnvelope(phone=phone_for(request, phone)), status=201)


async def create_phone_seed(request: web.Request) -> web.Response:
    await require_admin(request)
    data = await decode_body(request, SeedPhoneCreate)
    phone = await service.create_phone(scripts_of(request), data.to_create())
    return json_response(PhoneEnvelope(phone=phone_for(request, phone)), status=201)


async def list_phones(request: web.Request) -> web.Response:
    page = page_params(request)
    total, phones = await service.list_phones(redis_of(request), page, scripts_of(request).fast)
    phones = [phone_for(request, phone) for phone in phones]
    return json_response(PhonePage(phones=phones, **page.counts(total)))


async def get_phone(request: web.Request) -> web.Response:
    phone = await service.get_phone(redis_of(request), path_id(request))
    return json_response(PhoneEnvelope(phone=phone_for(request, phone)))


async def update_phone(request: web.Request) -> web.Response:
    await require_admin(request)
    phone_id = path_id(request)
    data = await decode_body(request, PhoneUpdate)
    phone = await service.update_phone(scripts_of(request), phone_id, data)
    return json_response(PhoneEnvelope(phone=phone_for(request, phone)))


async def restock(request: web.Request) -> web.Response:
    await require_admin(request)
    phone_id = path_id(request)
    data = await decode_body(request, Restock)
    phone = await service.restock(scripts_of(request), phone_id, data.quantity)
    return json_response(PhoneEnvelope(phone=phone_for(request, phone)))
