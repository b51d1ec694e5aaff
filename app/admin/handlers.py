"""Thin HTTP handlers of the admin area."""

from __future__ import annotations

from aiohttp import web

from app.admin.audit import run_audit
from app.auth import require_admin
from app.handlers import redis_of
from app.models import json_response


async def audit(request: web.Request) -> web.Response:
    await require_admin(request)
    return json_response(await run_audit(redis_of(request)))
