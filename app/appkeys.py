"""Every typed key of the aiohttp application's storage."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from app.auth import TokenCache
    from app.events.hub import EventHub
    from app.events.sockets import EventSocket
    from app.health import Readiness
    from app.orders.grants import Refiller
    from app.orders.saga_service import PlaceOrder
    from app.orders.settler import Settler
    from app.overload import OverloadControl
    from app.phones.page_cache import CataloguePages
    from app.redis_gateway import RedisGateway
    from app.scripts import Scripts
    from app.settings import Settings

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
# The request paths' Redis (app/redis_gateway.py): scripts, reads, list pages, tokens.
REDIS_GATEWAY: web.AppKey[RedisGateway] = web.AppKey("redis_gateway")
# redis-py's client, for what the gateway does not cover (streams, transactions):
# a RedisCluster when REDIS_CLUSTER_NODES is set (app/redis_clients.py).
REDIS: web.AppKey[Redis | RedisCluster] = web.AppKey("redis")
SCRIPTS: web.AppKey[Scripts] = web.AppKey("scripts")
# The reservation saga's settler of this worker (on both tiers).
SETTLER: web.AppKey[Settler] = web.AppKey("settler")
# Escrow's refills of this worker (app/orders/grants.py): the stripe order's hook.
REFILLER: web.AppKey[Refiller] = web.AppKey("refiller")
# POST /orders' order path with this app's scripts, settler, refiller and settings bound
# once at startup (app/orders/handlers.py: bind_order_path), not per order.
PLACE_ORDER: web.AppKey[PlaceOrder] = web.AppKey("place_order")
TOKEN_CACHE: web.AppKey[TokenCache] = web.AppKey("token_cache")
# This worker's remembered pages of GET /phones, checked against the catalogue's clocks.
CATALOGUE_PAGES: web.AppKey[CataloguePages] = web.AppKey("catalogue_pages")
# This worker's overload control: its in-flight count and adaptive limit.
INFLIGHT: web.AppKey[OverloadControl] = web.AppKey("inflight")
READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
# The WebSocket fan-out (app/events): this worker's stream reader and its open sockets.
EVENT_HUB: web.AppKey[EventHub] = web.AppKey("event_hub")
EVENT_SOCKETS: web.AppKey[set[EventSocket]] = web.AppKey("event_sockets")
