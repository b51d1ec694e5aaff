"""Helpers every domain's handlers share: path ids and the app's resources."""

from __future__ import annotations

from aiohttp import web
from redis.asyncio import Redis

from app import appkeys
from app.scripts import Scripts


def path_id(request: web.Request) -> str:
    """The path's id; the route's pattern (app.routes) already checked it, so
    nothing else can reach a key name."""
    return request.match_info["id"]


def redis_of(request: web.Request) -> Redis:
    return request.app[appkeys.REDIS]


def scripts_of(request: web.Request) -> Scripts:
    return request.app[appkeys.SCRIPTS]
