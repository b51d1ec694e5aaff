"""The one way the request paths talk to Redis, timed inside.

``RedisGateway`` is what the scripts (app/scripts.py), the services' reads,
the list pages (app/paging.py), the token lookup and /readyz call. It is made
once per worker at start-up (``open_gateway``, from app/main.py) over one
``Transport``, which only moves commands and raw replies:

* ``MultiplexedRedis`` (app/fastredis.py): one pipelined connection, about
  30 us of CPU per call; the default for redis:// and unix:// URLs;
* ``ClientTransport``: any redis-py client with its reply parsing turned off,
  so it answers raw replies too (RESP3 on redis-py's default: a hash is a
  map where the multiplexed connection's RESP2 gives a flat list; the gateway
  reads both). Used for
  rediss:// (TLS), which the multiplexed connection does not speak. The
  cluster (docs/data-tier.md) is meant to arrive here too: redis-py's
  ``RedisCluster`` routes each command, EVALSHA included, by its keys, and its
  pipelines group commands per node, so a cluster transport is a
  ``ClientTransport`` over it plus, for ``SCRIPT LOAD``/``SCRIPT EXISTS``,
  every primary (a failover's new primary answers NOSCRIPT: ``run_script``
  reloads and retries, which is safe because NOSCRIPT means it did not run).

Errors are redis-py's exception classes on both transports, so the error
middleware answers the same whichever was chosen. Every call is timed here
into ``phoneshop_redis_call_duration_seconds{call}``: ``script:<name>`` per
Lua script (a NOSCRIPT reload included), the command name of a single
command, ``PIPELINE`` for several in one write.

What the gateway does not cover yet keeps the redis-py client
(``appkeys.REDIS``, a ``TimedRedis``, timed by the same function): the event
streams (app/events), the audit's transactions (app/admin/audit.py) and the
dead-letter admin (app/admin/mail.py).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from app import metrics
from app.fastredis import MultiplexedRedis
from app.redis_clients import ClusterClient


def observe(call: str, started: float) -> None:
    metrics.redis_duration(call).observe(time.perf_counter() - started)


@dataclass(frozen=True, slots=True)
class LuaScript:
    name: str
    source: str
    sha: str
    # Safe to run twice with the same arguments (same answer, no second effect): the
    # cluster gateway may then send it again when a connection broke after sending it.
    rerunnable: bool = False

    @classmethod
    def of(cls, name: str, source: str, *, rerunnable: bool = False) -> LuaScript:
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest(), rerunnable)


class WriteUnconfirmed(Exception):
    """A script ran on its primary but fewer replicas than asked confirmed it within
    REDIS_WAIT_MS (app/cluster_gateway.py): it may vanish with that primary. It is
    answered 503 ``write_unconfirmed`` (app/scripts.py), never as a success."""

    def __init__(self, script: str, reply: Any, replicas: int | None, wanted: int) -> None:
        heard = "no answer" if replicas is None else f"{replicas} of {wanted} replicas"
        super().__init__(f"{script}: the write is not confirmed ({heard})")
        self.script = script
        # The script's own answer (None when it is unknown), for the ids it names.
        self.reply = reply
        self.replicas = replicas
        self.wanted = wanted


class NotOnOneNode(Exception):
    """A script over several partitions did not run: its keys are not all served by one
    node (a Redis Cluster whose slot map says so, or whose node refused a key it no
    longer serves, before the script's first write). The caller takes the split path."""


class Transport(Protocol):
    """Moves commands and raw RESP replies; raises redis-py's exceptions."""

    async def execute(self, *args: Any) -> Any: ...

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]: ...

    @property
    def connection(self) -> object | None: ...

    async def aclose(self) -> None: ...


class ClientTransport:
    """A redis-py client as a transport: raw replies, as the multiplexed
    connection gives them. The client must be the transport's own: its
    response callbacks are turned off."""

    def __init__(self, client: Redis) -> None:
        client.response_callbacks = {}
        self._client = client

    @classmethod
    def on_pool(cls, pool: ConnectionPool) -> ClientTransport:
        """A client of its own on a shared pool (closing it leaves the pool open)."""
        return cls(Redis(connection_pool=pool))

    async def execute(self, *args: Any) -> Any:
        return await self._client.execute_command(*args)

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for args in commands:
                pipe.execute_command(*args)
            return await pipe.execute()

    @property
    def connection(self) -> object | None:
        # A pool has no one connection whose loss /readyz should notice.
        return None

    async def aclose(self) -> None:
        await self._client.aclose()


def decode_hash(reply: list[bytes] | dict[bytes, bytes]) -> dict[str, str]:
    """HGETALL's raw reply, decoded: RESP2's flat field, value, ... list or RESP3's map."""
    if isinstance(reply, dict):
        return {field.decode(): value.decode() for field, value in reply.items()}
    return {reply[i].decode(): reply[i + 1].decode() for i in range(0, len(reply), 2)}


class RedisGateway:
    """Every Redis call of the request paths, over the transport chosen at start-up."""

    # Every key on one server, so a command or a script may name keys of any partition
    # (a customer's cancel, app/orders/saga_service.py); False on the cluster.
    one_node = True

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    @property
    def connection(self) -> object | None:
        """The transport's connection, as an opaque token: a different one means
        it was dropped and made again (None for a pool)."""
        return self.transport.connection

    async def execute(self, *args: Any) -> Any:
        """One command; its raw reply."""
        started = time.perf_counter()
        try:
            return await self.transport.execute(*args)
        finally:
            observe(args[0], started)

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Several commands in one write (no MULTI); their raw replies in order."""
        started = time.perf_counter()
        try:
            return await self.transport.execute_many(commands)
        finally:
            observe("PIPELINE", started)

    async def run_script(self, script: LuaScript, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA; after NOSCRIPT (a restarted or flushed server, a new
        primary), load it and run it: NOSCRIPT means it did not run."""
        started = time.perf_counter()
        try:
            try:
                return await self.transport.execute("EVALSHA", script.sha, len(keys), *keys, *args)
            except NoScriptError:
                await self.transport.execute("SCRIPT", "LOAD", script.source)
                return await self.transport.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        finally:
            observe(f"script:{script.name}", started)

    async def run_read_script(self, script: LuaScript, keys: list[str], args: list[Any]) -> Any:
        """A script that writes nothing (``#!lua flags=no-writes``), sent as a read is:
        EVALSHA like any command, so on the cluster no replica is waited for (there is no
        write to confirm). After NOSCRIPT, load it and run it again."""
        started = time.perf_counter()
        evalsha = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            try:
                return await self.transport.execute(*evalsha)
            except NoScriptError:
                await self.transport.execute("SCRIPT", "LOAD", script.source)
                return await self.transport.execute(*evalsha)
        finally:
            observe(f"script:{script.name}", started)

    def run_on_one_node(
        self, script: LuaScript, across_slots: LuaScript, keys: list[str], args: list[Any]
    ) -> Awaitable[Any]:
        """A script whose keys span partitions, where one node serves them all: on one
        redis-server that is always so, and the script runs as it is (``across_slots``,
        its form for a cluster node's several slots, is the cluster gateway's). The
        script's own awaitable, not a coroutine around it: every order on one
        redis-server passes here (P1)."""
        return self.run_script(script, keys, args)

    def host_partition(self, partition: int) -> int | None:
        """The stripe host partition (docs/escrow.md, section 1) of the primary serving
        ``partition``: None here, where one redis-server serves every partition, so every
        order collapses into one script and no stripe is ever used."""
        return None

    def host_partitions(self) -> list[int]:
        """Every primary's host partition, lowest first: none on one redis-server."""
        return []

    async def read_strings_with(
        self, keys: Sequence[str], commands: list[tuple[Any, ...]]
    ) -> tuple[list[bytes | None], list[Any]]:
        """The values of the string ``keys``, which may be of any partitions (None for a
        missing one), and the raw replies of ``commands``, in one round trip (on a
        cluster, one per node): here one MGET beside the commands."""
        replies = await self.execute_many([("MGET", *keys), *commands])
        return list(replies[0]), replies[1:]

    async def get(self, key: str) -> bytes | None:
        return await self.execute("GET", key)

    async def hgetall(self, key: str) -> dict[str, str]:
        return decode_hash(await self.execute("HGETALL", key))

    async def hmget(self, key: str, fields: list[str]) -> list[bytes | None]:
        return await self.execute("HMGET", key, *fields)

    async def hgetall_many(self, keys: list[str]) -> list[dict[str, str]]:
        """Several hashes in one write; a missing one is an empty dict."""
        return [decode_hash(row) for row in await self.execute_many([("HGETALL", k) for k in keys])]

    async def aclose(self) -> None:
        await self.transport.aclose()


def open_gateway(pool: ConnectionPool, timeout: float) -> RedisGateway:
    """The multiplexed connection to the pool's server when it can speak to it,
    else a redis-py client on the pool itself (TLS)."""
    fast = MultiplexedRedis.for_pool(pool, timeout)
    if fast is not None:
        return RedisGateway(fast)
    return RedisGateway(ClientTransport.on_pool(pool))


# ---- the redis-py client for what the gateway does not cover --------------------------

# Blocking reads would time the wait. Scripts are timed by name in the gateway;
# the few run through this client (the dead-letter requeue, the audit's reads)
# stay untimed, as they were.
_UNTIMED = frozenset({"EVALSHA", "EVAL", "XREAD", "XREADGROUP", "BLPOP", "BRPOP", "BZPOPMIN"})


class TimedPipeline(Pipeline):
    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        started = time.perf_counter()
        try:
            return await super().execute(raise_on_error)
        finally:
            observe("PIPELINE", started)


class TimedRedis(Redis):
    """redis-py's client with its single commands and pipelines timed by name."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        name = args[0].upper() if args and isinstance(args[0], str) else ""
        if not name or name in _UNTIMED:
            return await super().execute_command(*args, **options)
        started = time.perf_counter()
        try:
            return await super().execute_command(*args, **options)
        finally:
            observe(name, started)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        return TimedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


class TimedRedisCluster(ClusterClient):
    """redis-py's cluster client with its single commands timed by name, as TimedRedis."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        name = args[0].upper() if args and isinstance(args[0], str) else ""
        if not name or name in _UNTIMED:
            return await super().execute_command(*args, **kwargs)
        started = time.perf_counter()
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            observe(name, started)


def gateway_over(redis: Redis) -> RedisGateway:
    """A gateway on a redis-py client's pool, for tools and tests that hold one."""
    return RedisGateway(ClientTransport.on_pool(redis.connection_pool))
