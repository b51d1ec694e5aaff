"""Helpers every domain's handlers share: path ids and the app's resources."""

from __future__ import annotations

from aiohttp import web
from redis.asyncio import Redis

from app import appkeys
from app.ids import is_valid_id
from app.problems import ProblemError
from app.scripts import Scripts


def path_id(request: web.Request, not_found_code: str, name: str = "id") -> str:
    """The path's id, checked against the id pattern; anything else cannot exist."""
    value = request.match_info[name]
    if not is_valid_id(value):
        raise ProblemError(not_found_code, f"No resource with id {value!r}")
    return value


def redis_of(request: web.Request) -> Redis:
    return request.app[appkeys.REDIS]


def scripts_of(request: web.Request) -> Scripts:
    return request.app[appkeys.SCRIPTS]
