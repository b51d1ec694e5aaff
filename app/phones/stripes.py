"""A phone's stripes as the catalogue sees them (docs/escrow.md, sections 6 and 7): its
price written to every stripe, and its shown stock.

A striped phone's units are in its pool (the phone hash's ``stock``, partition ``Q``) and
in stripes ``sq{S}<id>`` on host partitions ``S`` (``sh{Q}<id>`` names them). On one
redis-server no stripe is ever made (every order collapses), so nothing here runs there.

* **Prices.** update_phone.lua bumps the phone's price generation and, when the phone has
  stripes, puts ``<id>:<gen>`` on ``sp{Q}`` and answers the hosts. ``reprice`` writes the
  price to every host's stripe in parallel (reprice_stripe.lua: only a newer generation
  applies), then takes the entry off ``sp{Q}``; only then does the PATCH answer 200, so after
  it every stripe sells at the new price. ``finish_reprice`` is the settler's sweep of an
  entry whose request died: the phone's current generation and price, to its current hosts.
"""

from __future__ import annotations

import asyncio
from typing import Any

from app import keys
from app.partitions import partition_of
from app.redis_gateway import RedisGateway
from app.scripts import Scripts


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def reprice(
    scripts: Scripts, phone_id: str, gen: int | str, price_cents: int | str, hosts: list[Any]
) -> None:
    """The price of generation ``gen`` on every host's stripe, in parallel; each write
    confirmed as any script's (a WriteUnconfirmed is raised as Scripts.run raises it)."""
    results = await asyncio.gather(
        *(
            scripts.run("reprice_stripe", [keys.stripe(int(host), phone_id)], [gen, price_cents])
            for host in hosts
        ),
        return_exceptions=True,
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def reprice_after_update(scripts: Scripts, phone_id: str, due: dict[str, Any]) -> None:
    """update_phone.lua's answer of stripes to reprice: write them, then the entry off the
    reprices due list (a plain ZREM: another PATCH's entry has another generation)."""
    await reprice(scripts, phone_id, due["gen"], due["price_cents"], due["hosts"])
    await scripts.gateway.execute("ZREM", keys.reprices_due(partition_of(phone_id)), due["due"])


async def finish_reprice(
    scripts: Scripts, gateway: RedisGateway, partition: int, entry: str
) -> None:
    """The settler's: an entry ``<phone_id>:<gen>`` of ``sp{Q}`` left by a request that
    died. The phone's generation and price now (as new as the entry's, or newer) go to
    the hosts it has now, then the entry goes."""
    phone_id = keys.reprice_entry_phone(entry)
    (gen, price), hosts = await gateway.execute_many(
        [
            ("HMGET", keys.phone(phone_id), "gen", "price_cents"),
            ("SMEMBERS", keys.stripe_hosts(phone_id)),
        ]
    )
    if price is not None and hosts:
        await reprice(
            scripts, phone_id, _text(gen or b"0"), _text(price), [_text(h) for h in hosts]
        )
    await gateway.execute("ZREM", keys.reprices_due(partition), entry)
