"""Which key layout (app/keys.py) a Redis holds, checked before the app serves it.

The partitioned layout renamed every key, so this version would see an older
database as an empty shop, and writing to it would leave two half-shops in one
Redis. ``make run``'s web launcher (app/ops/instances.py) calls ``check_at_start``
before it starts any instance:

* the ``layout`` key says this version: go on;
* no ``layout`` key and none of the old layout's keys (``ledger``, ``phones``, ...):
  a fresh database, so write ``layout`` (the first start) and go on;
* an old layout's keys without ``layout``, or another version: refuse, saying what to
  do. There is no migration yet: start from a fresh data directory. (Each version's
  change is noted at app/keys.py's LAYOUT_VERSION: layout 4's data, for one, holds
  indexes of all orders that later layouts neither write nor read, layout 5's order
  hashes have field names layout 6 does not read, and layout 6's status indexes are
  single zsets that layout 7 neither writes nor lists: it reads status chunks; layout
  7's Idempotency-Key buckets are 6 hours wide, where layout 8 looks only in buckets a
  TTL wide; layout 8's order clock holds the seq alone, where layout 9's placing scripts
  read the current status chunk from it too, and would refuse to place.)

The same on a Redis Cluster (REDIS_CLUSTER_NODES): each command is on one key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from redis import Redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from app import keys
from app.ops.poll import wait_until
from app.redis_clients import cluster_options
from app.settings import (
    Settings,
    SettingsError,
    cluster_nodes_from_env,
    redacted_url,
    redis_url_from_env,
)

# make run starts redis-server beside the launcher: how long to wait for it to answer.
REDIS_WAIT_S = 30.0


class LayoutError(RuntimeError):
    """This Redis holds another layout; the message says what to do."""


def refusal(found: str) -> str:
    return (
        f"this Redis holds data in an older key layout ({found}); this version uses "
        f"layout {keys.LAYOUT_VERSION}: every key in one of 128 partitions "
        "(docs/data-tier.md, section 2; since layout 5 no index of all orders, since 6 "
        "short order fields: section 10.1, since 7 status lists in chunks: 10.2, since 8 Idempotency-Key buckets a day wide: 10.1, since 9 the current status chunk "
        "in the order clock: 10.2). It would misread the old data or serve an "
        "empty shop beside it, so it does not start. There is no migration yet: start "
        "from a fresh data directory (stop make run, then "
        "`mv var/redis var/redis.old-layout` and make run "
        "again; or point REDIS_URL at an empty Redis). Keep the old directory to read "
        "the old data with the previous version of PhoneShop."
    )


def check_layout(redis: Redis | RedisCluster) -> bool:
    """True when this call wrote the marker (a fresh database); LayoutError when the
    data is of another layout."""
    found = redis.get(keys.LAYOUT)
    if found is None:
        old = [key for key in keys.OLD_LAYOUT_KEYS if redis.exists(key)]
        if old:
            raise LayoutError(refusal("keys " + ", ".join(old) + f" and no {keys.LAYOUT!r} key"))
        if redis.set(keys.LAYOUT, keys.LAYOUT_VERSION, nx=True):
            return True
        found = redis.get(keys.LAYOUT)  # another starting instance wrote it first
    if found != str(keys.LAYOUT_VERSION).encode():
        raise LayoutError(refusal(f"{keys.LAYOUT!r} is {found!r}"))
    return False


def _client(url: str, nodes: tuple[tuple[str, int], ...]) -> Redis | RedisCluster:
    """A client of the configured store (app/redis_clients.py's choice, synchronously):
    every command here is on one key, so a cluster client routes each."""
    if nodes:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes],
            socket_timeout=5,
            socket_connect_timeout=5,
            **cluster_options(url),
        )
    return Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


def check_at_start(env: Mapping[str, str] | None = None) -> str | None:
    """None when the app may start; otherwise why not (for the launcher to print)."""
    env = os.environ if env is None else env
    try:
        url = redis_url_from_env(env, Settings.redis_url)
        nodes = cluster_nodes_from_env(env)
    except SettingsError as error:
        return str(error)
    clients: list[Redis | RedisCluster] = []

    def answers() -> Redis | RedisCluster | None:
        try:
            if not clients:
                clients.append(_client(url, nodes))  # a cluster client connects here
            return clients[0] if clients[0].ping() else None
        except (RedisError, RedisClusterException):
            return None

    where = f"Redis Cluster at {nodes}" if nodes else f"Redis at {redacted_url(url)}"
    try:
        check_layout(wait_until(answers, where, REDIS_WAIT_S))
    except TimeoutError as error:
        return f"{error}: the key layout check needs it before any instance starts"
    except LayoutError as error:
        return str(error)
    finally:
        for client in clients:
            client.close()
    return None
