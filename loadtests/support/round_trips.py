"""A gateway transport that counts round trips and commands: the cost tests
(tests/) and loadtests/list_cost.py measure a page's Redis work with it."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from app.redis_gateway import ClientTransport


class CountingTransport(ClientTransport):
    """ClientTransport over its own client on ``redis``'s pool, counting as it goes."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(Redis(connection_pool=redis.connection_pool))
        self.round_trips = 0
        self.commands = 0

    async def execute(self, *args: Any) -> Any:
        self.round_trips += 1
        self.commands += 1
        return await super().execute(*args)

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        self.round_trips += 1
        self.commands += len(commands)
        return await super().execute_many(commands)
