"""The aiohttp application: ``gunicorn app.main:create_app``.

Nothing connects at import time: the Redis client is made per worker, after
gunicorn forked, in ``cleanup_ctx``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app import appkeys
from app.admin.metrics import get_metrics
from app.auth import TokenCache
from app.cluster_gateway import open_cluster_gateway
from app.events.hub import close_event_sockets, events_ctx
from app.health import Readiness
from app.middlewares import front_middleware
from app.observe import flush_observations, instrument
from app.openapi import openapi_json
from app.orders.grants import refiller_ctx
from app.orders.handlers import bind_order_path
from app.orders.settler import settler_ctx
from app.overload import OverloadControl
from app.phones.page_cache import CataloguePages
from app.redis_clients import cluster_client
from app.redis_gateway import TimedRedis, TimedRedisCluster, open_gateway
from app.routes import SPECLESS_ROUTES, route_table
from app.routing import add_routes
from app.scripts import Scripts
from app.settings import Settings

# Bodies above this are refused with 413 (nginx refuses them first, at 64k).
CLIENT_MAX_SIZE = 64 * 1024


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[appkeys.SETTINGS]
    if settings.redis_cluster_nodes:
        async for _ in redis_cluster_ctx(app):
            yield
        return
    # A blocking pool: past max_connections a request waits (up to the
    # timeout) for a free connection instead of failing at once.
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        timeout=settings.redis_timeout,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        max_connections=settings.redis_max_connections,
        # No silent retries: a write script whose reply was lost may have run,
        # and running it twice would debit twice. Clients retry with an
        # Idempotency-Key instead.
        retry=Retry(NoBackoff(), 0),
    )
    redis = TimedRedis.from_pool(pool)
    app[appkeys.REDIS] = redis
    # Chosen once: the multiplexed connection (app/fastredis.py), about 30 us
    # of CPU per call instead of about 200 through the pool, unless TLS.
    gateway = open_gateway(pool, settings.redis_timeout)
    app[appkeys.REDIS_GATEWAY] = gateway
    app[appkeys.SCRIPTS] = Scripts(gateway)
    yield
    await gateway.aclose()
    await redis.aclose()


async def redis_cluster_ctx(app: web.Application) -> AsyncIterator[None]:
    """The same two clients on a Redis Cluster (REDIS_CLUSTER_NODES): the gateway's
    scripts wait for the replica (app/cluster_gateway.py), and the redis-py client of
    the events, audit and dead-letter admin routes by key. Neither retries after a
    connection error, for the reason above."""
    settings = app[appkeys.SETTINGS]
    gateway = open_cluster_gateway(
        settings.redis_url,
        settings.redis_cluster_nodes,
        settings.redis_wait_replicas,
        settings.redis_wait_ms,
        settings.redis_timeout,
        settings.redis_max_connections,
    )
    redis = cluster_client(
        settings.redis_url,
        settings.redis_cluster_nodes,
        cluster_class=TimedRedisCluster,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        max_connections=settings.redis_max_connections,
        retry=Retry(NoBackoff(), 0),
    )
    app[appkeys.REDIS] = redis
    app[appkeys.REDIS_GATEWAY] = gateway
    app[appkeys.SCRIPTS] = Scripts(gateway)
    yield
    await gateway.aclose()
    await redis.aclose()


def build_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[front_middleware],
        client_max_size=CLIENT_MAX_SIZE,
    )
    app[appkeys.SETTINGS] = settings
    app[appkeys.TOKEN_CACHE] = TokenCache()
    app[appkeys.CATALOGUE_PAGES] = CataloguePages()
    app[appkeys.INFLIGHT] = OverloadControl(settings)
    app[appkeys.READINESS] = Readiness()
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(events_ctx)  # after redis_ctx: replays use its pool
    # On both tiers: it settles the split saga's orders (none on one redis-server unless
    # SAGA_ALWAYS_SPLIT), and whatever a worker that died midway left.
    app.cleanup_ctx.append(settler_ctx)  # after redis_ctx: it settles over its gateway
    app.cleanup_ctx.append(refiller_ctx)  # after settler_ctx: it hands it the settles
    app.on_startup.append(instrument)  # runs after every cleanup_ctx: wraps its clients
    app.on_startup.append(bind_order_path)  # after instrument: binds the wrapped scripts
    app.on_shutdown.append(close_event_sockets)
    app.on_cleanup.append(flush_observations)
    add_routes(app, route_table(settings.bench_routes) + SPECLESS_ROUTES)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/metrics", get_metrics)  # Prometheus text: app/admin/metrics.py
    return app


async def create_app() -> web.Application:
    """gunicorn's zero-argument factory: settings come from the environment."""
    return build_app(Settings.from_env())
