"""Escrow's stripes (docs/escrow.md): a phone's units lent to a quota on another primary's
host partition, so an order of a customer there is one script on one node.

This module holds the host side's calls that the order path and the refills share: the
grant's receipt (app/lua/receive_grant.lua) and the order sold from stripes
(app/lua/place_from_stripe.lua); each worker's stripe hints (which phones to try a stripe
order for); and STRIPE_ANSWERS, the hook the refills listen on. Which partition hosts a
primary's stripes is the gateway's to say (RedisGateway.host_partition: None on one
redis-server, where no stripe is ever used).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app import keys
from app.orders import saga
from app.orders.idempotency import RecordPlace
from app.orders.service import chunk_entry_keys, new_order_keys, older_buckets
from app.partitions import chunk_of, partition_of
from app.problems import retry_later
from app.scripts import ScriptResult, Scripts

log = logging.getLogger("app.orders.stripes")

# place_from_stripe's refusal when a line's stripe is missing, closed or short: nothing
# written, the split saga answers the order.
STRIPE_SHORT = "stripe_short"
# How long a stripe that answered stripe_short is not tried again by this worker, unless a
# receipt refilled it meanwhile (StripeHints.refilled): each try costs a refused call.
DRY_S = 1.0
# Sends of a stripe order whose answer was lost (the gateway's own rerun included in each):
# it is idempotent by order id, and never followed by the saga (docs/escrow.md 3).
UNKNOWN_OUTCOME_SENDS = 3


class StripeHints:
    """Each worker's belief of which phones are striped, and which stripes just ran dry
    (docs/escrow.md 3, as app/orders/chunk_hints.py for chunks). Learnt from the receipts
    this worker sent (receive_grant), the stripe orders' answers and whoever else reads a
    phone's mode (``learn``). A wrong belief costs one refused call (stripe_short, nothing
    written) or one saga order, never a wrong write."""

    def __init__(self, dry_s: float = DRY_S) -> None:
        self.dry_s = dry_s
        self._striped: set[str] = set()
        self._dry_until: dict[tuple[int, str], float] = {}

    def learn(self, phone_id: str, striped: bool) -> None:
        if striped:
            self._striped.add(phone_id)
        else:
            self._striped.discard(phone_id)

    def striped(self, phone_id: str) -> bool:
        return phone_id in self._striped

    def all_striped(self, phone_ids: list[str]) -> bool:
        return all(phone_id in self._striped for phone_id in phone_ids)

    def worth_trying(self, host: int, phone_ids: list[str]) -> bool:
        """Every line's phone hinted striped, and none of their stripes on ``host`` dry."""
        if not all(phone_id in self._striped for phone_id in phone_ids):
            return False
        if not self._dry_until:
            return True
        now = time.monotonic()
        return all(self._dry_until.get((host, p), 0.0) <= now for p in phone_ids)

    def ran_dry(self, host: int, phone_id: str) -> None:
        self._dry_until[(host, phone_id)] = time.monotonic() + self.dry_s

    def refilled(self, host: int, phone_id: str) -> None:
        self._dry_until.pop((host, phone_id), None)

    def forget(self) -> None:
        """Nothing striped, as on a fresh database (the tests' flushes)."""
        self._striped.clear()
        self._dry_until.clear()


# This worker's: every app instance in a process shares it, which only saves refusals.
STRIPE_HINTS = StripeHints()


@dataclass(frozen=True, slots=True)
class StripeAnswer:
    """What one line's stripe said to an order: ``stock_left`` after the order, or None
    when the stripe was missing, closed or short (stripe_short: the order went by the
    saga)."""

    host: int
    phone_id: str
    stock_left: int | None


class StripeAnswers:
    """The hook the refills listen on (docs/escrow.md 4, "When"): every stripe order's
    answer, line by line, told to each listener right after the order's answer was
    decided, on the request's task. A listener must not block or await: it queues (a
    refill below low water, or of a short stripe) and returns. A listener's exception is
    logged, never the order's."""

    def __init__(self) -> None:
        self._listeners: list[Callable[[StripeAnswer], None]] = []

    def listen(self, listener: Callable[[StripeAnswer], None]) -> Callable[[], None]:
        """Adds ``listener``; returns the call that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def tell(self, answers: list[StripeAnswer]) -> None:
        for listener in list(self._listeners):
            for answer in answers:
                try:
                    listener(answer)
                except Exception:
                    log.exception("stripe answer listener failed on %s", answer)


# This worker's (one per process, like STRIPE_HINTS).
STRIPE_ANSWERS = StripeAnswers()


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
    expires_at_ms: int | None = None,
) -> ScriptResult:
    """A grant's receipt on its host (idempotent by ``grant_id``, which was minted in
    ``host``): 200 with the stripe's ``stock``, ``got``, ``price_cents`` and ``gen``
    (``flag``: received by this run), or 503 ``service_unavailable`` when the fence
    aborted the grant, or (``expires_at_ms``, the grant's reservation expiry, which the
    app's grants send) past its expiry by Redis TIME: nothing written. The gateway sends
    it again after a connection lost once it was sent (RERUNNABLE)."""
    if partition_of(grant_id) != host:
        raise ValueError(f"grant id {grant_id} was not minted in host partition {host}")
    result = await scripts.call(
        "receive_grant",
        receive_grant_keys(host, phone_id),
        [
            grant_id,
            units,
            price_cents,
            gen,
            saga.keep_until(),
            *(() if expires_at_ms is None else (expires_at_ms,)),
        ],
    )
    if result.status == 200:
        # The stripe has units now: this worker's orders may try it.
        STRIPE_HINTS.learn(phone_id, True)
        STRIPE_HINTS.refilled(host, phone_id)
    return result


def place_from_stripe_keys(
    customer_id: str,
    order_id: str,
    status: str,
    record: RecordPlace | None,
    host: int,
    phone_ids: list[str],
) -> list[str]:
    """place_from_stripe.lua's KEYS, in the order its header lists them: the customer
    partition's first (the declared ones of the across_slots form), then the host's."""
    partition, chunk = partition_of(order_id), chunk_of(order_id)
    return [
        *new_order_keys(customer_id, order_id, status, record, chunk),
        keys.aborts(partition),
        *chunk_entry_keys(partition, status, chunk),
        keys.ledger(host),
        *(keys.stripe(host, phone_id) for phone_id in phone_ids),
        *older_buckets(customer_id, record),
    ]


async def place_from_stripe(
    scripts: Scripts, keys_: list[str], args: list[str | bytes | int]
) -> ScriptResult:
    """place_from_stripe.lua on the one node serving the customer's partition and the host
    (NotOnOneNode, nothing written, where not). A lost answer (the connection broke once
    it was sent, after the gateway's own rerun) is sent again: idempotent by order id, a
    run that placed the order answers it. Never the saga after an unknown outcome: past
    UNKNOWN_OUTCOME_SENDS it is a 503 (the order may be there; the client's retry with
    its Idempotency-Key finds it)."""
    for attempt in range(UNKNOWN_OUTCOME_SENDS):
        try:
            return await scripts.call("place_from_stripe", keys_, args, one_node=True)
        except (RedisConnectionError, RedisTimeoutError) as error:
            log.warning("stripe order %s: answer lost (%s), sending it again", args[0], error)
            if attempt + 1 == UNKNOWN_OUTCOME_SENDS:
                raise retry_later(
                    "service_unavailable", 1, "The order's outcome is not known yet; retry it"
                ) from error
    raise AssertionError("unreachable")
