"""Escrow's refills (docs/escrow.md, section 4): a grant lends ``k`` units of a striped
phone's pool to its stripe on another primary's host partition ``S``.

A grant is a reservation whose commit point is a receipt:

1. ``reserve_grant`` on the phone's partition ``Q`` under a grant id ``G`` minted in ``S``
   (the units move stock -> held; refused unless the phone is striped and its pool keeps
   ``STRIPE_FLOOR`` units);
2. ``receive_grant`` on ``S`` (app/orders/stripes.py): the units join the stripe, unless
   the settler's fence aborted ``G`` first;
3. the settle on ``Q``, batched by the settler as an order's is: held -> lent (received)
   or held -> stock (fenced).

A worker that dies between the steps leaves what the settler finishes: ``rd{Q}[G]`` falls
due, the fence on ``S`` (its grant kind: the receipt ``gr{S}[G]`` is the proof) decides,
confirmed by the replica before the settle (app/orders/settler.py).

When: a ``Refiller`` per worker gathers what is wanted for ``REFILL_DELAY_S`` and sends
one grant per (host, phone) of the gather, none for a pair whose grant is still in flight
from this worker, all off the request path. It hears every stripe order's answer
(app/orders/stripes.py: STRIPE_ANSWERS, ``heard``): a stripe short, or below its low water
(a quarter of the grant its demand would make), is wanted; and a reserve that just set a
phone striped (``stripe_everywhere``: one grant to each other primary's host).

Size: ``k = clamp(2^ceil(log2(d)), K_MIN, K_MAX)`` for a demand ``d`` (the host's orders of
the phone in the last horizon), never more than ``(stock - STRIPE_FLOOR) / (N - 1)`` on
``N`` primaries (reserve_grant.lua caps it with the stock it reads, atomically).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from app import appkeys
from app.orders import saga, stripes
from app.orders.saga import crash_if
from app.orders.saga_service import SettleSoon
from app.orders.stripes import STRIPE_ANSWERS, StripeAnswer
from app.partitions import new_id, partition_of
from app.redis_gateway import RedisGateway, WriteUnconfirmed
from app.scripts import Scripts
from app.vocabulary import decode_grant, decode_items

log = logging.getLogger("app.orders.grants")

# Hot and deep (docs/escrow.md, section 4): a phone is striped by its reserves when it has
# at least STRIPE_MIN units and HOT_RESERVES apart reserves within one HORIZON_MS. 4, not
# 16: a long tail of phones selling a few times in 10 s then sells from stripes too
# (section 9: Zipf(1)'s saga share 0.25 -> 0.10 of its orders).
STRIPE_MIN = 64
HOT_RESERVES = 4
HORIZON_MS = 10_000


def striping_rule(horizon_ms: int = HORIZON_MS) -> str:
    """reserve_stock.lua's striping rule argument: "<stripe_min> <hot> <horizon_ms>"."""
    return f"{STRIPE_MIN} {HOT_RESERVES} {horizon_ms}"


# The rule as the app sends it (ESCROW_STRIPES on).
STRIPING_RULE = striping_rule()
# The units a pool never lends: the saga's tail (section 5: at most (N - 1) * 1.25 * K_MAX
# + STRIPE_FLOOR units go by the saga at the end of a phone's stock).
STRIPE_FLOOR = 64
# A grant costs about 1.2 collapsed orders of Redis CPU and an order from a stripe saves
# about 0.5 (section 9): K_MIN keeps every grant paying; K_MAX bounds a recall's tail.
K_MIN = 8
K_MAX = 256
# How long wanted refills are gathered before one grant per (host, phone).
REFILL_DELAY_S = 0.05
# Grants of one gather in flight at once.
GRANT_CALLS = 8


def grant_size(demand: int) -> int:
    """``clamp(2^ceil(log2(demand)), K_MIN, K_MAX)``; the pool's cap is the script's."""
    return min(K_MAX, max(K_MIN, 2 ** math.ceil(math.log2(max(demand, 1)))))


@dataclass(frozen=True, slots=True)
class Granted:
    """A grant's end as its caller saw it: ``outcome`` COMMITTED (received), ABORTED (the
    fence refused its receipt), or the reserve's refusal ``code`` with nothing held."""

    grant_id: str
    units: int
    outcome: str = ""
    code: str = ""


async def grant(
    scripts: Scripts,
    settle_soon: SettleSoon,
    *,
    host: int,
    phone_id: str,
    units: int,
    shares: int,
    reservation_ttl_ms: int,
    fault_point: str = "",
    now_ms: int,
) -> Granted:
    """One grant of up to ``units`` units of ``phone_id`` to its stripe on ``host``: the
    reserve on the phone's partition, the receipt on the host, then the settle handed to
    ``settle_soon``. A call that fails leaves the grant to the settler (raised)."""
    grant_id = new_id(host)
    expires = now_ms + reservation_ttl_ms
    reserved = await saga.reserve_grant(
        scripts,
        grant_id,
        phone_id,
        units,
        expires,
        floor=STRIPE_FLOOR,
        shares=shares,
        minimum=K_MIN,
    )
    if reserved.status != 200:
        return Granted(grant_id, 0, code=str(reserved.payload.get("code", "")))
    crash_if("granted", fault_point)
    reservation = reserved.payload["reservation"]
    head = decode_grant(reservation)
    assert head is not None  # reserve_grant stores a grant's head
    [line] = decode_items(head.lines)
    received = await stripes.receive_grant(
        scripts,
        host=host,
        phone_id=phone_id,
        grant_id=grant_id,
        units=line.quantity,
        price_cents=line.unit_price_cents,
        gen=head.gen,
        # Past it the settler may fence the grant, and later prune the marker: the
        # receipt refuses itself by this expiry then.
        expires_at_ms=expires,
    )
    crash_if("received", fault_point)
    # 200: received (now or before); else the fence aborted it, and its marker on the
    # host refuses the receipt for good: the units may go back.
    outcome = saga.COMMITTED if received.status == 200 else saga.ABORTED
    settle_soon(partition_of(phone_id), grant_id, outcome, reservation)
    return Granted(grant_id, line.quantity, outcome=outcome)


@dataclass
class Refiller:
    """This worker's refills: what the stripe orders and the striping reserves want,
    gathered for ``delay_s``, then one grant per (host, phone) of the gather."""

    gateway: RedisGateway
    scripts: Scripts
    settle_soon: SettleSoon
    reservation_ttl_ms: int
    fault_point: str = ""
    delay_s: float = REFILL_DELAY_S
    # The horizon the demand d is counted in (the striping rule's).
    horizon_ms: int = HORIZON_MS
    # (host, phone id) -> the largest demand wanted during this gather.
    _wanted: dict[tuple[int, str], int] = field(default_factory=dict, repr=False)
    # Pairs whose grant this worker has sent and not seen end: a gather skips them.
    _in_flight: set[tuple[int, str]] = field(default_factory=set, repr=False)
    pending: set[asyncio.Task[Any]] = field(default_factory=set, repr=False)
    # (host, phone id) -> (horizon number, stripe orders heard in it): the demand d.
    _heard: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict, repr=False)
    # The last grants this worker sent, as they ended (for the logs and the tests).
    granted: deque[Granted] = field(default_factory=lambda: deque(maxlen=256), repr=False)

    def want(self, host: int, phone_id: str, demand: int = K_MIN) -> None:
        """A refill of ``phone_id``'s stripe on ``host`` within ``delay_s`` (the stripe
        order's hook: below low water, or short). Nobody awaits it."""
        if not self._wanted:
            asyncio.get_running_loop().call_later(self.delay_s, self._flush)
        key = (host, phone_id)
        self._wanted[key] = max(self._wanted.get(key, 0), demand)

    def heard(self, answer: StripeAnswer) -> None:
        """A stripe order's answer for one line (STRIPE_ANSWERS' listener): counted as
        demand for the stripe in this horizon; a refill wanted when the stripe was short
        or is below its low water, a quarter of the grant this demand makes."""
        key = (answer.host, answer.phone_id)
        horizon = int(time.time() * 1000) // self.horizon_ms
        seen, count = self._heard.get(key, (horizon, 0))
        count = count + 1 if seen == horizon else 1
        if len(self._heard) > 10_000 and key not in self._heard:
            self._heard.clear()  # a bound on memory: the counts are only a hint
        self._heard[key] = (horizon, count)
        if answer.stock_left is None or answer.stock_left < grant_size(count) // 4:
            self.want(answer.host, answer.phone_id, count)

    def stripe_everywhere(self, phone_ids: list[str]) -> None:
        """First stripes of phones a reserve just set striped: one grant to the host of
        every primary but the phone's own (whose customers' orders take the pool in one
        script anyway). Nothing on one redis-server (no hosts)."""
        for phone_id in phone_ids:
            own = self.gateway.host_partition(partition_of(phone_id))
            for host in self.gateway.host_partitions():
                if host != own:
                    self.want(host, phone_id, HOT_RESERVES)

    def _flush(self) -> None:
        wanted, self._wanted = self._wanted, {}
        todo = {key: demand for key, demand in wanted.items() if key not in self._in_flight}
        if not todo:
            return
        self._in_flight |= set(todo)
        task = asyncio.create_task(self._grant_all(todo))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _grant_all(self, todo: dict[tuple[int, str], int]) -> None:
        calls = asyncio.Semaphore(GRANT_CALLS)
        shares = len(self.gateway.host_partitions()) - 1

        async def one(host: int, phone_id: str, demand: int) -> None:
            async with calls:
                try:
                    if shares < 1:
                        return  # one primary: no other host to lend to
                    self.granted.append(
                        await grant(
                            self.scripts,
                            self.settle_soon,
                            host=host,
                            phone_id=phone_id,
                            units=grant_size(demand),
                            shares=shares,
                            reservation_ttl_ms=self.reservation_ttl_ms,
                            fault_point=self.fault_point,
                            now_ms=int(time.time() * 1000),
                        )
                    )
                except (RedisError, OSError, WriteUnconfirmed) as error:
                    # The grant's reservation (if any) falls due and the settler
                    # fences and settles it.
                    log.warning(
                        "grant of %s to %d failed, left to the settler: %r", phone_id, host, error
                    )
                finally:
                    self._in_flight.discard((host, phone_id))

        await asyncio.gather(*(one(host, phone, demand) for (host, phone), demand in todo.items()))

    async def drain(self) -> None:
        """Until every refill wanted so far has run (shutdown; tests)."""
        while self._wanted or self.pending:
            if self.pending:
                await asyncio.gather(*self.pending, return_exceptions=True)
            else:
                await asyncio.sleep(self.delay_s)  # the gather's flush is timed


async def refiller_ctx(app: web.Application) -> AsyncIterator[None]:
    """This worker's Refiller (after settler_ctx: it hands its settles to the settler,
    which drains them after this drained its grants)."""
    settings = app[appkeys.SETTINGS]
    refiller = Refiller(
        app[appkeys.REDIS_GATEWAY],
        app[appkeys.SCRIPTS],
        app[appkeys.SETTLER].settle_soon,
        reservation_ttl_ms=settings.reservation_ttl_ms,
        fault_point=settings.saga_fault_point,
    )
    app[appkeys.REFILLER] = refiller
    stop_listening = STRIPE_ANSWERS.listen(refiller.heard)
    yield
    stop_listening()
    with contextlib.suppress(Exception):
        await refiller.drain()
