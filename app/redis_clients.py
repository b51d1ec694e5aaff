"""redis-py clients of the configured data store, made one way for every user.

One redis-server is ``REDIS_URL``; a Redis Cluster is ``REDIS_CLUSTER_NODES`` (its
start-up nodes) with ``REDIS_URL``'s credentials and TLS. The request paths' scripts
and reads go through app/redis_gateway.py instead; this is for the rest: the event
streams (app/events), the audit and the dead-letter admin (app/admin), the mail
worker (mail/worker.py) and the operator tools.

redis-py's ``RedisCluster`` routes every keyed command by its slot, follows MOVED and
ASK, and learns a new topology after a failover; no slot map of our own. A cluster
client has no ``connection_pool`` (a pool per node instead) and refuses a few
single-server options, which ``redis_client`` drops.
"""

from __future__ import annotations

from typing import Any, NoReturn

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

# Single-server options a RedisCluster has no parameter for: the cluster keeps a pool
# per node, and a single connection could not reach more than one node.
_SINGLE_SERVER_ONLY = frozenset({"single_connection_client", "connection_pool", "timeout"})
# What a cluster client takes from REDIS_URL: who we are and how we talk, not where.
_CREDENTIALS = ("username", "password")


def cluster_options(url: str) -> dict[str, Any]:
    """REDIS_URL's username, password and TLS, as RedisCluster's keyword arguments."""
    parsed = parse_url(url)
    options = {name: parsed[name] for name in _CREDENTIALS if parsed.get(name)}
    if parsed.get("connection_class") is SSLConnection:
        options["ssl"] = True
    return options


class ClusterClient(RedisCluster):
    """redis-py's cluster client, whose topology that cannot be read right now, and whose
    connection closed under a call (raise_as_lost), are a ConnectionError, as one
    redis-server that went away (503 + Retry-After).

    redis-py reads the slot map again at its first call, after a node failed and after
    CLUSTERDOWN, inside any command; mid-failover no node may answer, or those that do
    may leave slots without a primary. It raises RedisClusterException then, which is
    also its word for a caller's mistake (keys of two slots): an app answered that as an
    internal error (a 500 in tests/test_cluster_failover.py, CI of 2026-12-03)."""

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        try:
            return await super().initialize(*args, **kwargs)
        except RedisClusterException as error:
            raise RedisConnectionError(f"no Redis Cluster topology: {error}") from error

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except (RuntimeError, AttributeError) as error:
            raise_as_lost(error)


def cluster_client(
    url: str,
    nodes: tuple[tuple[str, int], ...],
    cluster_class: type[ClusterClient] = ClusterClient,
    **options: Any,
) -> RedisCluster:
    for name in _SINGLE_SERVER_ONLY & options.keys():
        del options[name]
    # redis-py's default (5) re-reads the topology at every 5th MOVED by closing the whole
    # client, which disconnects every node's connections, those of calls in flight too:
    # under load a reshard then surfaced "Connection closed by server" to callers whose
    # own node never moved (tests/test_cluster_reshard.py). 0 patches the moved slot
    # from the MOVED reply instead; a failover still re-reads it (ConnectionError).
    options.setdefault("reinitialize_steps", 0)
    return cluster_class(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        **cluster_options(url),
        **options,
    )


def redis_client(
    url: str, cluster_nodes: tuple[tuple[str, int], ...], **options: Any
) -> Redis | RedisCluster:
    """A client of one redis-server at ``url``, or of the cluster when ``cluster_nodes``."""
    if cluster_nodes:
        return cluster_client(url, cluster_nodes, **options)
    return Redis.from_url(url, **options)


def closed_under_the_call(error: BaseException) -> bool:
    """A call whose connection was closed under it by redis-py's cluster client, which on
    a topology change (a failover) disconnects a node's connections in the background,
    its free ones too while another call may be taking one. The call then fails with
    uvloop's RuntimeError ("the handler is closed") or an AttributeError on the
    connection's writer, already None: a lost connection, not a bug of the caller."""
    if isinstance(error, RuntimeError):
        return "closed" in str(error)
    if isinstance(error, AttributeError):
        return "'NoneType' object has no attribute" in str(error)
    return False


def raise_as_lost(error: RuntimeError | AttributeError) -> NoReturn:
    """``error`` raised again, as the ConnectionError it is when redis-py closed the
    connection under the call (closed_under_the_call): the caller then treats it as any
    lost connection (maybe ran; 503 + Retry-After) rather than as a bug (a 500)."""
    if closed_under_the_call(error):
        raise RedisConnectionError(f"the connection was closed under the call: {error}") from error
    raise error
