"""The cancel of an order sold from stripes (docs/escrow.md, section 6).

Such an order's hash has a stripe mark ``v = "<S>:<epoch>"`` (app/vocabulary.py:
stripe_mark): its units came from its phones' stripes on host partition ``S`` at that
epoch, not from the pools. A cancel gives them back there while each stripe is open at
that epoch; a stripe closed since (its epoch moved: its ``sold`` went home with its
shipment, into the pool's ``sold``) gets nothing, and the units go back to the pools
instead, by today's return_stock.lua from ``sold``.

* **Collapsed** (one node serves the order's partition ``P`` and ``S``: the usual case,
  ``S`` is the lowest partition of ``P``'s primary): cancel_order.lua in its stripe form,
  one script, refund and give-back together. ``stripe_closed`` (nothing written), or
  ``NotOnOneNode`` (a reshard moved ``S``), and the cancel goes split.
* **Split**: refund_order.lua on ``P`` (the order on the take-back list ``ro{P}``), then
  ``give_back``: return_to_stripe.lua on ``S`` (idempotent by ``rr{S}``), or, when it
  answers ``stripe_closed``, return_stock.lua on each phone's partition; then the
  take-back entry goes. The settler's sweep of ``ro{P}`` calls ``give_back`` for an app
  that died in between (app/orders/settler.py).
"""

from __future__ import annotations

import asyncio
import logging

from app import keys
from app.auth import Principal
from app.fields import BALANCE_LIMIT, STOCK_LIMIT
from app.orders import saga
from app.orders.models import Order
from app.orders.service import (
    cancel_keys,
    chunk_move_keys,
    in_chunk,
    order_from_fields,
)
from app.partitions import partition_of
from app.scripts import Scripts
from app.vocabulary import CANCELLED, OPEN, decode_items, parse_stripe_mark

log = logging.getLogger("app.orders")

# cancel_order.lua's (stripe form) and return_to_stripe.lua's answer when a line's stripe
# is closed or at another epoch than the order's mark: nothing was written.
STRIPE_CLOSED = "stripe_closed"


def cancel_stripe_order_keys(
    order_id: str, owner_id: str, items: str, host: int, chunk: int
) -> list[str]:
    """cancel_order.lua's KEYS in its stripe form, in the order its header lists them: the
    order partition's, then each line's stripe on ``host``, then ``host``'s ledger."""
    return [
        *cancel_keys(order_id, owner_id, chunk),
        *chunk_move_keys(partition_of(order_id), OPEN, CANCELLED, chunk),
        *[keys.stripe(host, line.phone_id) for line in decode_items(items)],
        keys.ledger(host),
    ]


def return_to_stripe_keys(host: int, items: str) -> list[str]:
    """return_to_stripe.lua's KEYS, in the order its header lists them (all of ``host``)."""
    return [
        keys.taken_back(host),
        keys.ledger(host),
        *[keys.stripe(host, line.phone_id) for line in decode_items(items)],
    ]


async def cancel_on_one_node(
    scripts: Scripts,
    principal: Principal,
    order_id: str,
    owner_id: str,
    items: str,
    mark: str,
    request_id: str,
    now_ms: int,
) -> Order | None:
    """cancel_order.lua's stripe form where one node serves the order's partition and its
    stripes' host; NotOnOneNode (nothing written) where not. None, with nothing written,
    when a stripe was closed since the order was sold."""
    host, epoch = parse_stripe_mark(mark)
    args: list[str | bytes | int] = [
        owner_id,
        principal.customer_id or "",
        now_ms,
        request_id,
        items,
        BALANCE_LIMIT,
        STOCK_LIMIT,
    ]
    result = await in_chunk(
        lambda chunk: scripts.run(
            "cancel_order",
            cancel_stripe_order_keys(order_id, owner_id, items, host, chunk),
            [*args, chunk, epoch],
            one_node=True,
        ),
        order_id,
    )
    if result.payload.get("code") == STRIPE_CLOSED:
        return None
    return order_from_fields(result.payload)


async def give_back(scripts: Scripts, order_id: str, items: str, mark: str) -> bool:
    """A refunded stripe order's units back: to its stripes while they are at the mark's
    epoch, else to the pools (from their ``sold``, where the stripes' shipments took it).
    Idempotent either way (``rr{S}``, ``rr{Q}``). True when every unit is back, so the
    order's take-back entry may go; False (logged) leaves it due for the settler."""
    host, epoch = parse_stripe_mark(mark)
    answer = await scripts.call(
        "return_to_stripe",
        return_to_stripe_keys(host, items),
        [order_id, epoch, items, STOCK_LIMIT],
    )
    if answer.status == 200:
        return True
    if answer.payload.get("code") != STRIPE_CLOSED:
        log.error("give-back of %s to its stripes on %d: %s", order_id, host, answer.payload)
        return False
    returned = await asyncio.gather(
        *(
            saga.return_stock(scripts, partition, order_id, lines)
            for partition, lines in saga.items_by_partition(items).items()
        )
    )
    for answer in returned:
        if answer.status != 200:
            log.error("give-back of %s to the pools: %s", order_id, answer.payload)
    return all(answer.status == 200 for answer in returned)
