"""Thin HTTP handlers of the admin area (the routes declare auth="admin")."""

from __future__ import annotations

from aiohttp import web

from app.admin.audit import run_audit
from app.handlers import redis_of
from app.responses import json_response
from app.routing import Call


async def audit(call: Call[None]) -> web.Response:
    return json_response(await run_audit(redis_of(call.request)))
