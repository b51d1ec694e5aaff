"""The app's resources, as every domain's handlers reach them (the path id is
``Call.id``, app/routing.py)."""

from __future__ import annotations

from aiohttp import web
from redis.asyncio import Redis

from app import appkeys
from app.redis_gateway import RedisGateway
from app.scripts import Scripts


def gateway_of(request: web.Request) -> RedisGateway:
    return request.app[appkeys.REDIS_GATEWAY]


def redis_of(request: web.Request) -> Redis:
    return request.app[appkeys.REDIS]


def scripts_of(request: web.Request) -> Scripts:
    return request.app[appkeys.SCRIPTS]
