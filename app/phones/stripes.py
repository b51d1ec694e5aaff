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
* **Shown stock** (``show_stripe_stock``). GET /phones/{id} and the catalogue's rows show a
  striped phone's stock as its pool + its stripes' stock (a closed stripe's is 0: its close
  shipped it). A row is striped when its hash has a ``mode`` or lends units (``lent``):
  a phone that never lent, every phone of one redis-server, costs nothing more. The rows'
  stripes come in one more round trip (a pipeline, one per primary, in parallel): each
  phone's stripe hosts ``sh{Q}<id>`` beside the stock of its stripe on every other primary's
  host partition now (the gateway's slot map), summed over the hosts ``sh`` names; a host
  it names that was not read so (a reshard moved it) costs one round trip more.
  Exact at rest; units of a transfer in flight during the read may be missed or counted
  twice (docs/escrow.md, section 7).
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


def striped(fields: dict[str, str]) -> bool:
    """The phone hash may have stripes: it has a mode (striped, or draining until its
    stripes are home) or lends units."""
    return bool(fields.get("mode")) or int(fields.get("lent") or 0) > 0


async def show_stripe_stock(gateway: RedisGateway, rows: list[dict[str, str]]) -> None:
    """Each striped phone hash of ``rows`` gets ``stock`` = its pool + its stripes' stock,
    in place; the others are left as they are, with no call."""
    if gateway.one_node:
        return  # one redis-server: no stripe, ever
    rows = [row for row in rows if striped(row)]
    if not rows:
        return
    every_host = gateway.host_partitions()
    commands: list[tuple[str, ...]] = []
    asked: list[list[int]] = []
    for row in rows:
        # Not the phone's own primary's host: its orders there take the pool (a stripe
        # there, after a reshard, is one that sh names and this round did not read).
        own = gateway.host_partition(partition_of(row["id"]))
        hosts = [host for host in every_host if host != own]
        asked.append(hosts)
        commands.append(("SMEMBERS", keys.stripe_hosts(row["id"])))
        commands += [("HGET", keys.stripe(host, row["id"]), "stock") for host in hosts]
    replies = await gateway.execute_many(commands)
    elsewhere: list[tuple[dict[str, str], int]] = []
    at = 0
    for row, hosts in zip(rows, asked, strict=True):
        named = {int(host) for host in replies[at]}
        stocks = replies[at + 1 : at + 1 + len(hosts)]
        at += 1 + len(hosts)
        total = int(row["stock"]) + sum(
            int(stock or 0) for host, stock in zip(hosts, stocks, strict=True) if host in named
        )
        row["stock"] = str(total)
        elsewhere += [(row, host) for host in sorted(named.difference(hosts))]
    if elsewhere:
        more = await gateway.execute_many(
            [("HGET", keys.stripe(host, row["id"]), "stock") for row, host in elsewhere]
        )
        for (row, _), stock in zip(elsewhere, more, strict=True):
            row["stock"] = str(int(row["stock"]) + int(stock or 0))
