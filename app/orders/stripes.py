"""Escrow's stripes (docs/escrow.md): a phone's units lent to a quota on another primary's
host partition, so an order of a customer there is one script on one node.

This module holds the calls on the host side that the order path and the refills share:
the grant's receipt (app/lua/receive_grant.lua). Which partition hosts a primary's
stripes is the gateway's to say (RedisGateway.host_partition: None on one redis-server,
where no stripe is ever used).
"""

from __future__ import annotations

from app import keys
from app.orders import saga
from app.partitions import partition_of
from app.scripts import ScriptResult, Scripts


def receive_grant_keys(host: int, phone_id: str) -> list[str]:
    """receive_grant.lua's KEYS, in the order its header lists them (all of ``host``)."""
    return [
        keys.stripe(host, phone_id),
        keys.ledger(host),
        keys.grant_receipts(host),
        keys.grant_receipts_due(host),
        keys.aborts(host),
    ]


async def receive_grant(
    scripts: Scripts,
    *,
    host: int,
    phone_id: str,
    grant_id: str,
    units: int,
    price_cents: int,
    gen: int,
) -> ScriptResult:
    """A grant's receipt on its host (idempotent by ``grant_id``, which was minted in
    ``host``): 200 with the stripe's ``stock``, ``got``, ``price_cents`` and ``gen``
    (``flag``: received by this run), or 503 ``service_unavailable`` when the fence
    aborted the grant (nothing written). The gateway sends it again after a connection
    lost once it was sent (RERUNNABLE)."""
    if partition_of(grant_id) != host:
        raise ValueError(f"grant id {grant_id} was not minted in host partition {host}")
    return await scripts.call(
        "receive_grant",
        receive_grant_keys(host, phone_id),
        [grant_id, units, price_cents, gen, saga.keep_until()],
    )
