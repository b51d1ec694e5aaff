"""The Redis gateway on a Redis Cluster: redis-py routes, the write path waits for the replica.

``open_cluster_gateway`` (app/main.py, when REDIS_CLUSTER_NODES is set) makes a
``RedisGateway`` whose transport is redis-py's ``redis.asyncio.RedisCluster``: every
command, EVALSHA included, goes to the primary of its keys' slot; MOVED, ASK and a
new topology after a failover are the library's business, never ours.
``SCRIPT LOAD`` and ``SCRIPT EXISTS`` go to every primary.

What the cluster adds is the promise of docs/data-tier.md, section 6: a script's
write is acknowledged only once the primary's replica has it. A script is sent as
``[EVALSHA ..., SET <ack key>, WAIT <replicas> <ms>]`` in one write on ONE
connection of the primary that serves its first key (``WAIT`` counts only its own
connection's writes, so a WAIT on any other connection would answer for nothing):

* WAIT heard from ``replicas`` replicas: the script's reply. A ``SET`` of an ack key
  in the same slot goes between them (``[EVALSHA, SET, WAIT]``), so the WAIT also
  covers what a script answers from without writing (an Idempotency-Key replay);
* fewer (a stopped or lagging replica): ``WriteUnconfirmed``, answered 503
  ``write_unconfirmed``: the write stays on the primary, and the client's retry
  with the same Idempotency-Key settles whether it survived;
* the script did not run there (MOVED or ASK after a reshard or failover,
  TRYAGAIN, CLUSTERDOWN, NOSCRIPT on a new primary, or no connection could be
  opened): the library's own routed EVALSHA runs it (loading it on every primary
  after NOSCRIPT), then ``[SET <ack key of the same slot>, WAIT]`` on one connection
  of that slot's primary proves it: replication is in order, so the replica that
  acknowledged the later write has the script's too;
* the connection broke (or timed out) after the script was sent: it may have run.
  A script marked ``rerunnable`` (the saga's steps, idempotent by order id:
  app/scripts.py) takes the fallback above; any other is a ConnectionError (503 +
  Retry-After) as on one redis-server, since running it twice could add twice (a
  deposit). Either way the topology is read again for the next call.

Connection errors are never retried by the library either (``retry`` 0), for the
same reason as app/main.py's pool: a lost reply may belong to a script that ran.
With ``REDIS_WAIT_REPLICAS=0`` scripts go through the library alone, without WAIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MaxConnectionsError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app import keys, partitions
from app.redis_clients import cluster_client, raise_as_lost
from app.redis_gateway import (
    LuaScript,
    NotOnOneNode,
    RedisGateway,
    WriteUnconfirmed,
    observe,
)
from app.scripts import load_source

# Several string keys of one node's slots in one call (read_strings_with).
READ_STRINGS = LuaScript.of("read_strings", load_source("read_strings"))
# Replies that mean the script did not run on the node it was sent to.
NOT_RUN = (MovedError, AskError, TryAgainError, ClusterDownError, NoScriptError)
# How long an ack key lives: one per slot, rewritten by every script there; the
# expiry clears the slots nobody writes any more. A minute is far past any WAIT.
ACK_TTL_MS = 60_000
# A slot being resharded answers a script whose keys are split between the two nodes
# TRYAGAIN until MIGRATE has moved the last of them: a slot's keys at a time, one or a
# few per MIGRATE, so a partition of thousands of keys stays split for seconds
# (tests/test_cluster_reshard.py). redis-py gives up after 16 tries (about 0.4 s:
# "TTL exhausted"); the script never ran, so the gateway tries again, this long at most.
MOVING_SLOT_RETRY_S = 10.0
MOVING_SLOT_BACKOFF_S = 0.05
# The ack's own redirections: ASK while its slot moves, MOVED once it has moved.
ACK_ATTEMPTS = 3


def _not_served_here(error: ResponseError) -> bool:
    """A node's answer to a script that touched a key of a slot it does not serve
    (moved away, or migrating without the key): raised by that call, so the script
    wrote nothing if it touched every such key before its first write."""
    return "non local key" in str(error)


def _never_ran(error: ClusterError) -> bool:
    """redis-py's "TTL exhausted": every try was redirected (MOVED, ASK) or refused
    (TRYAGAIN), so the command ran nowhere; any other failure it raises as it is."""
    return type(error) is ClusterError and str(error).startswith("TTL exhausted")


class NotSent(RedisConnectionError):
    """No connection to the node could be opened: nothing was sent, nothing ran."""


def _routable(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """redis-py's cluster client knows SCRIPT's subcommands (LOAD, EXISTS: every
    primary) only as one word, "SCRIPT LOAD"."""
    if len(args) > 1 and isinstance(args[0], str) and args[0].upper() == "SCRIPT":
        return (f"SCRIPT {str(args[1]).upper()}", *args[2:])
    return args


async def ready(connection: Connection) -> None:
    """Connected, and not a pooled socket the server closed meanwhile (a restarted or
    failed-over node): redis-py's own pool check, so a stale socket is replaced
    before anything is sent on it rather than failing after."""
    await connection.connect()
    try:
        if await connection.can_read():
            raise RedisConnectionError("the connection has unread data")
    except (RedisConnectionError, RedisTimeoutError, OSError):
        await connection.disconnect()
        await connection.connect()


async def on_one_connection(node: ClusterNode, commands: list[tuple[Any, ...]]) -> list[Any]:
    """``commands`` in one write on one connection of ``node``; their replies in
    order, a server error as the exception object in its place. ``NotSent`` when
    no connection could be opened."""
    connection = node.acquire_connection()
    try:
        try:
            await ready(connection)
        except (RedisConnectionError, RedisTimeoutError, OSError) as error:
            raise NotSent(f"cannot connect to {node.name}: {error}") from error
        await connection.send_packed_command(connection.pack_commands(commands), False)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await connection.read_response())
            except ResponseError as error:
                replies.append(error)
        return replies
    except BaseException as error:
        # Replies may still be owed on it: it must never serve another call.
        await connection.disconnect(nowait=True)
        if isinstance(error, RuntimeError | AttributeError):
            raise_as_lost(error)
        raise
    finally:
        node.release(connection)


class ClusterTransport:
    """RedisCluster as the gateway's transport: each command routed by its keys,
    a pipeline split per node by the library."""

    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster

    async def ready(self) -> None:
        """The slot map, learnt at the first call (and again after the library dropped
        it): a cluster that cannot be reached is a ConnectionError (ClusterClient), 503 +
        Retry-After as one redis-server that is down."""
        await self.cluster.initialize()

    async def execute(self, *args: Any) -> Any:
        await self.ready()
        return await self.cluster.execute_command(*_routable(args))

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        await self.ready()
        pipe = self.cluster.pipeline(transaction=False)
        for args in commands:
            pipe.execute_command(*_routable(args))
        try:
            return await pipe.execute()
        except (RuntimeError, AttributeError) as error:
            raise_as_lost(error)

    @property
    def connection(self) -> object | None:
        # A pool per node: no one connection whose loss /readyz should notice.
        return None

    async def aclose(self) -> None:
        await self.cluster.aclose()


class ClusterGateway(RedisGateway):
    """The gateway over ``ClusterTransport``, whose scripts wait for ``replicas``."""

    transport: ClusterTransport
    one_node = False

    def __init__(
        self,
        cluster: RedisCluster,
        replicas: int,
        wait_ms: int,
        *,
        max_calls: int,
        wait_s: float,
    ) -> None:
        super().__init__(ClusterTransport(cluster))
        self.cluster = cluster
        self.replicas = replicas
        self.wait_ms = wait_ms
        self._refreshing: asyncio.Future[None] | None = None
        # redis-py's per-node pools refuse a connection past max_connections at once
        # (MaxConnectionsError) where one redis-server's BlockingConnectionPool waits:
        # a burst of orders then got 503 on the cluster only (tests/test_races.py).
        # A call holds at most one connection of any node at a time, so at most
        # ``max_calls`` calls in flight keep every node's pool within its limit, and
        # a call past them waits for a free one, up to ``wait_s`` as the pool would.
        self._calls = asyncio.Semaphore(max_calls)
        self._wait_s = wait_s
        # read_strings_with's groups: per key set read (its callers read a fixed one, the
        # catalogue's clocks), the keys' positions grouped by the primary serving them.
        self._string_groups: dict[tuple[str, ...], list[list[int]]] = {}
        # host_partition's answers, for the slot map they were read from (its id).
        self._hosts: dict[int, int] = {}
        self._hosts_of = 0

    @contextlib.asynccontextmanager
    async def _call_slot(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._wait_s):
                await self._calls.acquire()
        except TimeoutError:
            raise MaxConnectionsError(f"no free connection within {self._wait_s} s") from None
        try:
            yield
        finally:
            self._calls.release()

    async def execute(self, *args: Any) -> Any:
        async with self._call_slot():
            return await super().execute(*args)

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        async with self._call_slot():
            return await super().execute_many(commands)

    async def run_script(self, script: LuaScript, keys: list[str], args: list[Any]) -> Any:
        started = time.perf_counter()
        try:
            async with self._call_slot():
                evalsha = ("EVALSHA", script.sha, len(keys), *keys, *args)
                await self.transport.ready()
                if not self.replicas or not keys:
                    return await self._routed(script, evalsha)
                return await self._run_and_wait(script, evalsha, keys[0])
        finally:
            observe(f"script:{script.name}", started)

    async def run_read_script(self, script: LuaScript, keys: list[str], args: list[Any]) -> Any:
        """Routed by its keys' slot like any read; ``SCRIPT LOAD`` after NOSCRIPT reaches
        every primary (ClusterTransport)."""
        async with self._call_slot():
            return await super().run_read_script(script, keys, args)

    async def read_strings_with(
        self, keys: Sequence[str], commands: list[tuple[Any, ...]]
    ) -> tuple[list[bytes | None], list[Any]]:
        """One read_strings.lua per primary for the keys it serves, by redis-py's slot map,
        in one pipeline with ``commands``: an MGET may name one slot only, and a GET each
        costs redis-py's cluster pipeline about 20 µs of CPU (2.6 ms for the catalogue's
        128 clocks). A key set's grouping is learnt at its first read, which is a GET each
        and loads the script on every primary; after NOSCRIPT (a failover, SCRIPT FLUSH)
        or a key its node no longer serves (a reshard), nothing was written: that read
        is a GET each too, and learns again."""
        wanted = tuple(keys)
        groups = self._string_groups.get(wanted)
        if groups is not None:
            reads = [
                ("EVALSHA", READ_STRINGS.sha, 1, *(wanted[i] for i in group)) for group in groups
            ]
            try:
                replies = await self.execute_many([*reads, *commands])
            except (ResponseError, RedisClusterException):
                del self._string_groups[wanted]
            else:
                values: list[bytes | None] = [None] * len(wanted)
                for group, read in zip(groups, replies[: len(groups)], strict=True):
                    for i, value in zip(group, read, strict=True):
                        values[i] = value
                return values, replies[len(groups) :]
        replies = await self.execute_many([*(("GET", key) for key in wanted), *commands])
        learnt = self.by_primary(list(wanted))
        if learnt is not None:
            await self.execute("SCRIPT", "LOAD", READ_STRINGS.source)  # reaches every primary
            self._string_groups[wanted] = learnt
        return list(replies[: len(wanted)]), replies[len(wanted) :]

    def by_primary(self, keys: list[str]) -> list[list[int]] | None:
        """The positions of ``keys`` grouped by the primary serving each, by redis-py's slot
        map; None while the map is not known yet or a slot has no primary."""
        groups: dict[str, list[int]] = {}
        try:
            for i, key in enumerate(keys):
                groups.setdefault(self.cluster.get_node_from_key(key).name, []).append(i)
        except RedisClusterException:
            return None
        return list(groups.values())

    def host_partition(self, partition: int) -> int | None:
        """The lowest partition served by the primary that serves ``partition``, by
        redis-py's slot map in memory (no round trip): that primary's stripe host
        (docs/escrow.md, section 1), where an order of a customer of ``partition`` finds
        its stripes. None while the map is not known or a partition has no primary. A
        stale map names a host its node no longer serves: the stripe order sent there is
        refused before any write (NotOnOneNode) and goes by the saga."""
        slots = self.cluster.nodes_manager.slots_cache
        if id(slots) != self._hosts_of:
            # A new map (redis-py builds one at every full refresh): learn the hosts again.
            self._hosts, self._hosts_of = {}, id(slots)
        try:
            primary = slots[partitions.slot(partition)][0].name
            # Remembered while its primary is still this partition's (a MOVED updates the
            # map in place): three lookups instead of a walk of up to 128 partitions.
            host = self._hosts.get(partition)
            if host is not None and slots[partitions.slot(host)][0].name == primary:
                return host
            for candidate in range(partition + 1):
                if slots[partitions.slot(candidate)][0].name == primary:
                    self._hosts[partition] = candidate
                    return candidate
        except (KeyError, IndexError, TypeError):
            return None
        return None  # unreachable: ``partition`` itself is served by its primary

    def host_partitions(self) -> list[int]:
        """Every primary's host partition, lowest first ([] while the map is not known):
        one pass over the partitions, each primary's first (the shown stock of a striped
        phone asks at every read)."""
        slots = self.cluster.nodes_manager.slots_cache
        hosts: dict[str, int] = {}
        try:
            for partition in range(partitions.PARTITIONS):
                hosts.setdefault(slots[partitions.slot(partition)][0].name, partition)
        except (KeyError, IndexError, TypeError):
            return []
        return sorted(hosts.values())

    async def run_on_one_node(
        self, script: LuaScript, across_slots: LuaScript, keys: list[str], args: list[Any]
    ) -> Any:
        """``across_slots`` (app/lua_prelude.py) on the primary that serves every key, by
        redis-py's slot map; NotOnOneNode, without sending anything, when the map puts
        them on several, and NotOnOneNode when the node refused a key it does not serve
        (a reshard or failover the map has not seen yet; the map is read again then): the
        script touches those before its first write, so it wrote nothing. The keys of the first key's slot
        are declared; EVALSHA goes by them, as any script's."""
        await self.transport.ready()
        try:
            primaries = {self.cluster.get_node_from_key(key).name for key in keys}
        except RedisClusterException as error:  # a slot no node serves right now
            raise NotOnOneNode(f"{script.name}: {error}") from error
        if len(primaries) != 1:
            raise NotOnOneNode(f"{script.name}: its keys are on {len(primaries)} primaries")
        slot = self.cluster.keyslot(keys[0])
        declared = 1
        while declared < len(keys) and self.cluster.keyslot(keys[declared]) == slot:
            declared += 1
        undeclared = keys[declared:]
        try:
            return await self.run_script(
                across_slots, keys[:declared], [len(undeclared), *undeclared, *args]
            )
        except ResponseError as error:
            if _not_served_here(error):
                # The map was stale (a reshard or failover): learn the new one, so the next
                # order's form and stripe host (host_partition) follow it.
                await self._refresh_topology()
                raise NotOnOneNode(f"{script.name}: {error}") from error
            raise

    async def _run_and_wait(self, script: LuaScript, evalsha: tuple[Any, ...], key: str) -> Any:
        reply: Any = None
        replicas: Any = None
        again = False
        try:
            reply, _, replicas = await on_one_connection(
                self.cluster.get_node_from_key(key), [evalsha, *self._proof(key)]
            )
        except MaxConnectionsError:
            raise  # this pool is full (nothing sent): 503, and the topology is fine
        except NotSent:
            await self._refresh_topology()
            again = True
        except (RedisConnectionError, RedisTimeoutError):
            # Sent, and maybe run: again only if running twice is safe (the docstring).
            await self._refresh_topology()
            if not script.rerunnable:
                raise
            again = True
        if again or isinstance(reply, NOT_RUN):
            reply = await self._routed(script, evalsha)
            replicas = await self._ack(key)
        if isinstance(reply, Exception):
            raise reply
        if not isinstance(replicas, int) or replicas < self.replicas:
            raise WriteUnconfirmed(
                script.name, reply, replicas if isinstance(replicas, int) else None, self.replicas
            )
        return reply

    async def _routed(self, script: LuaScript, evalsha: tuple[Any, ...]) -> Any:
        """The library's EVALSHA: routed, redirected; after NOSCRIPT (a flushed node, a
        new primary), load on every primary and run: NOSCRIPT means it did not run. A
        slot still being resharded is tried again (MOVING_SLOT_RETRY_S)."""
        deadline = time.monotonic() + MOVING_SLOT_RETRY_S
        while True:
            try:
                try:
                    return await self.cluster.execute_command(*evalsha)
                except NoScriptError:
                    await self.cluster.execute_command("SCRIPT LOAD", script.source)
                    return await self.cluster.execute_command(*evalsha)
            except ClusterError as error:
                if not _never_ran(error) or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(MOVING_SLOT_BACKOFF_S)

    def _proof(self, key: str) -> list[tuple[Any, ...]]:
        """A write of our own in ``key``'s slot, then WAIT, for the same connection as
        the script. The write makes WAIT answer for everything its primary applied
        before it (replication is in order), whichever connection applied it: the
        script's own writes, and the earlier ones a script that wrote nothing answers
        from (an Idempotency-Key replay, an order checked again). Without it, WAIT
        would count only this connection's last write."""
        return [
            ("SET", keys.write_ack(key), "1", "PX", ACK_TTL_MS),
            ("WAIT", self.replicas, self.wait_ms),
        ]

    async def _ack(self, key: str) -> int | None:
        """WAIT's answer after a write of our own in ``key``'s slot, on one connection
        of its primary; None when that could not be done (the write stays unconfirmed)."""
        node = self.cluster.get_node_from_key(key)
        asking: list[tuple[Any, ...]] = []
        for _ in range(ACK_ATTEMPTS):
            try:
                *_, written, replicas = await on_one_connection(node, [*asking, *self._proof(key)])
            except RedisError:
                await self._refresh_topology()
                return None
            if isinstance(written, AskError):
                # The slot is moving and the ack key went first: write it where it is now.
                # (The script ran there too if the library followed an ASK; if it ran on
                # the old node, MIGRATE carries its keys over later: docs in notes/reshard.md.)
                node = self.cluster.get_node(host=written.host, port=written.port)
                if node is None:
                    return None
                asking = [("ASKING",)]
                continue
            if isinstance(written, MovedError):
                await self._refresh_topology()
                node, asking = self.cluster.get_node_from_key(key), []
                continue
            if isinstance(written, Exception) or not isinstance(replicas, int):
                return None
            return replicas
        return None

    async def _refresh_topology(self) -> None:
        """Ask the cluster who serves what now (one question at a time, shared by every
        caller that failed meanwhile), so the next call goes to the right node."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())
        with contextlib.suppress(RedisError, OSError):
            await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        # The map itself, below ClusterClient's initialize: mid-failover it may not be
        # readable (RedisClusterException); the old one stays, and the caller goes on.
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            await self.cluster.nodes_manager.initialize()
        self._hosts = {}  # read from the new map at the next host_partition

    async def aclose(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refreshing
        await super().aclose()


def open_cluster_gateway(
    url: str,
    nodes: tuple[tuple[str, int], ...],
    replicas: int,
    wait_ms: int,
    socket_timeout: float,
    max_connections: int,
) -> ClusterGateway:
    """A gateway on the cluster whose start-up nodes are ``nodes``, with ``url``'s
    credentials. It connects at its first call, so an app started before its cluster
    is up answers 503 (and /readyz is not ready) until it is."""
    # Untimed: the gateway times each call itself.
    cluster = cluster_client(
        url,
        nodes,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        max_connections=max_connections,
        retry=Retry(NoBackoff(), 0),
    )
    return ClusterGateway(
        cluster, replicas, wait_ms, max_calls=max_connections, wait_s=socket_timeout
    )
