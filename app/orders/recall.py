"""The recall of a striped phone's lent units (docs/escrow.md, section 5): what the order
path runs when a short pool answered ``stock_lent`` (reserve_stock.lua, place_order.lua),
before it tries the order once more, and what the settler (app/orders/settler.py) runs for
a phone a dead app left draining.

Three steps, each one script on one partition, each idempotent:

1. ``drain_phone`` on the phone's partition Q: mode = draining (no grant starts from now
   on), the phone on the settler's recall list ``sw{Q}``, and the stripe hosts and grants
   in flight read in the same script, with the phone's count of recalls ended.
2. ``close_stripe`` on every host S, in parallel: fences the phone's grants to S, closes
   the stripe and moves its units into a shipment.
3. ``receive_shipments`` on Q, with every close's answer: settles the fenced grants,
   receives the shipments (once each), and, with nothing left out, the phone is pool-only
   again (and drained: not striped again until a restock). A receipt whose drain came
   before another recall of the phone ended is stale: it takes its shipments and grants
   by id, but leaves the stripe hosts and the mode alone (the phone may be striped
   anew). The shipments received leave their hosts' due lists (``sz{S}``: a plain ZREM,
   one pipelined round; the audit counts a shipment due as not at rest).

A step that fails leaves the phone draining and on ``sw{Q}``; the settler recalls it again
from step 1 (a close answers its shipment again; the receipt takes it once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from app import keys
from app.orders import saga
from app.orders.stripes import STRIPE_HINTS
from app.partitions import partition_of
from app.scripts import Scripts
from app.vocabulary import DRAINING, decode_grant_in_flight

log = logging.getLogger("app.orders.recall")

# How long after a recall began the settler finishes it if its app did not (ms): far above
# a recall's three round trips, so that a live app's recall is not done twice.
RECALL_GRACE_MS = 5_000


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Recalled:
    """What one recall of a phone did: the shipments it received now, the grants it
    settled now, and the phone after it (``lent`` 0 and ``mode`` "" when it is done;
    ``stock`` the pool's after the receipt, 0 when there was nothing to receive)."""

    phone_id: str
    received: list[str] = field(default_factory=list)
    settled: int = 0
    stock: int = 0
    lent: int = 0
    mode: str = ""
    # Hosts whose close failed (left to the settler).
    failed_hosts: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.lent == 0 and not self.mode and not self.failed_hosts


def _listed(value: object) -> list[str]:
    """A script's list (cjson answers an empty one as an object)."""
    return list(value) if isinstance(value, list) else []


@dataclass(frozen=True)
class Drained:
    """drain_phone.lua's answer: each stripe host of the phone with its grants in flight
    to it, the phone's lent units, and its recalls ended so far (for the receipt)."""

    hosts: dict[int, list[str]]
    lent: int = 0
    recalls: int = 0


async def drain(scripts: Scripts, phone_id: str, due_ms: int) -> Drained:
    """drain_phone.lua on the phone's partition; nothing out when the phone does not
    exist."""
    result = await scripts.call(
        "drain_phone",
        [
            keys.phone(phone_id),
            keys.stripe_hosts(phone_id),
            keys.grants_in_flight(phone_id),
            keys.drains_due(partition_of(phone_id)),
        ],
        [phone_id, due_ms],
    )
    if result.status != 200:
        return Drained({})
    hosts: dict[int, list[str]] = {int(host): [] for host in _listed(result.payload["hosts"])}
    for entry in _listed(result.payload["grants"]):
        host, grant_id = decode_grant_in_flight(entry)
        hosts.setdefault(host, []).append(grant_id)
    return Drained(hosts, int(result.payload["lent"]), int(result.payload["recalls"]))


async def close_stripe(
    scripts: Scripts, host: int, phone_id: str, grant_ids: list[str], due_ms: int
) -> dict[str, object]:
    """close_stripe.lua on host partition ``host``: its answer (``outcomes`` one per grant
    id, and ``shipment_id``/``shipment`` when the stripe had one)."""
    result = await scripts.call(
        "close_stripe",
        [
            keys.stripe(host, phone_id),
            keys.grant_receipts(host),
            keys.aborts(host),
            keys.aborts_due(host),
            keys.shipments(host),
            keys.shipments_due(host),
            keys.ledger(host),
        ],
        [phone_id, host, due_ms, saga.keep_until(), *grant_ids],
    )
    if result.status != 200:
        raise RuntimeError(f"close_stripe of {phone_id} on {host}: {result.payload}")
    return result.payload


async def receive_shipments(
    scripts: Scripts,
    phone_id: str,
    grants: list[tuple[int, str, str]],
    shipments: list[tuple[int, str, str]],
    *,
    recalls: int,
) -> dict[str, object]:
    """receive_shipments.lua on the phone's partition: ``grants`` as (host, grant id,
    outcome), ``shipments`` as (host, shipment id, shipment) for every host closed
    ("", "" for a host whose close answered no shipment), ``recalls`` the recalls ended
    that this recall's drain read."""
    partition = partition_of(phone_id)
    args: list[str | int] = [phone_id, saga.keep_until(), recalls, len(grants)]
    for host, grant_id, outcome in grants:
        args += [host, grant_id, outcome]
    for host, shipment_id, shipment in shipments:
        args += [host, shipment_id, shipment]
    result = await scripts.call(
        "receive_shipments",
        [
            keys.phone(phone_id),
            keys.stripe_hosts(phone_id),
            keys.grants_in_flight(phone_id),
            keys.taken_back(partition),
            keys.reservations(partition),
            keys.reservations_due(partition),
            keys.releases(partition),
            keys.releases_due(partition),
            keys.ledger(partition),
            keys.drains_due(partition),
        ],
        args,
    )
    if result.status != 200:
        raise RuntimeError(f"receive_shipments of {phone_id}: {result.payload}")
    return result.payload


async def recall(scripts: Scripts, phone_id: str, fault_point: str = "") -> Recalled:
    """Every stripe of the phone closed and its units home, as far as this call gets: see
    the module's docstring. Raises only if the drain or the receipt failed; a close that
    failed is in ``failed_hosts`` (the phone stays draining, for the settler)."""
    # Draining from now on: this worker sends the phone's orders to the pool (a stripe
    # order would be refused once its stripe closes: one call wasted per order).
    STRIPE_HINTS.learn(phone_id, False)
    drained = await drain(scripts, phone_id, _now_ms() + RECALL_GRACE_MS)
    hosts, lent = drained.hosts, drained.lent
    if not hosts:
        # Nothing out (another recall finished first: the drain left the phone pool-only),
        # or units lent with no stripe host or grant to fetch them from (a broken
        # invariant: left draining, the settler logs it every grace).
        if lent:
            log.error("recall of %s: %d units lent and no stripe host or grant", phone_id, lent)
        return Recalled(phone_id, lent=lent, mode=DRAINING if lent else "")
    due = _now_ms() + RECALL_GRACE_MS
    order = list(hosts)
    answers = await asyncio.gather(
        *(close_stripe(scripts, host, phone_id, hosts[host], due) for host in order),
        return_exceptions=True,
    )
    grants: list[tuple[int, str, str]] = []
    shipments: list[tuple[int, str, str]] = []
    failed: list[int] = []
    for host, answer in zip(order, answers, strict=True):
        if isinstance(answer, BaseException):
            log.warning("recall of %s: closing on %d failed: %r", phone_id, host, answer)
            failed.append(host)
            continue
        outcomes = _listed(answer.get("outcomes"))
        grants += [(host, g, outcome) for g, outcome in zip(hosts[host], outcomes, strict=True)]
        shipments.append(
            (host, str(answer.get("shipment_id", "")), str(answer.get("shipment", "")))
        )
    saga.crash_if("closed", fault_point)
    after = await receive_shipments(scripts, phone_id, grants, shipments, recalls=drained.recalls)
    # Received: off the hosts' lists of shipments due (they are for a dead app's recall),
    # in one pipelined round; one left there is removed by the settler's sweep.
    received = _listed(after["received"])
    if received:
        await scripts.gateway.execute_many(
            [
                ("ZREM", keys.shipments_due(host), shipment_id)
                for host, shipment_id, _ in shipments
                if shipment_id in received
            ]
        )
    return Recalled(
        phone_id,
        received=received,
        settled=int(str(after["settled"])),
        stock=int(str(after["stock"] or 0)),
        lent=int(str(after["lent"])),
        mode=str(after["mode"]),
        failed_hosts=failed,
    )


async def recall_all(scripts: Scripts, phone_ids: list[str], fault_point: str = "") -> None:
    """The order path's recall of the phones a stock_lent named, in parallel. A recall
    that fails is logged and left to the settler: the order is tried again either way,
    and answers stock_lent (503) if the units are still out."""
    outcomes = await asyncio.gather(
        *(recall(scripts, phone_id, fault_point) for phone_id in dict.fromkeys(phone_ids)),
        return_exceptions=True,
    )
    for phone_id, outcome in zip(dict.fromkeys(phone_ids), outcomes, strict=True):
        if isinstance(outcome, BaseException):
            log.warning("recall of %s failed, left to the settler: %r", phone_id, outcome)
