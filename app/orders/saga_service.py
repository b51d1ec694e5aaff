"""Placing and cancelling an order: the one order path, on one redis-server and on a
Redis Cluster alike, is the reservation saga (docs/data-tier.md, 3.1, 3.3 and 3.9).

Where one node serves the customer's partition and every phone's (one redis-server
always; a cluster when they share a primary), the saga collapses into one script:
place_order.lua, cancel_order.lua (app/orders/service.py). Nothing needs holding there,
since one script sees and moves every key at once. Where they do not, or where the node
refused a key it no longer serves (a reshard or failover since the slot map was read:
nothing written), it runs split: reserve on every phone partition in parallel, then
commit (or reject) on the customer's partition, then settle the reservations after the
answer (batched per phone partition by the settler). A split cancel refunds on the
order's partition, then gives the stock back on each phone's partition.

Whatever this request does not finish (its worker died, a call failed) is left in a state
the settler (app/orders/settler.py) finishes: every step is idempotent by order id, and
a reservation is released only after the commit was made impossible.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec

from app import keys
from app.auth import Principal
from app.fields import BALANCE_LIMIT, STOCK_LIMIT
from app.orders import recall, saga, service, stripe_cancel, stripes
from app.orders.chunk_hints import HINTS
from app.orders.idempotency import RecordPlace
from app.orders.models import Order
from app.orders.saga import crash_if
from app.orders.service import (
    CHUNK_TRIES,
    PlacedOrder,
    answered_order,
    cancel_keys,
    chunk_entry_keys,
    chunk_move_keys,
    idempotency_request,
    new_order_keys,
    newest_bucket,
    older_buckets,
    order_from_fields,
)
from app.orders.stripes import STRIPE_ANSWERS, STRIPE_HINTS, StripeAnswer
from app.partitions import chunk_of, partition_of
from app.problems import ProblemError, retry_later
from app.redis_gateway import NotOnOneNode, RedisGateway, WriteUnconfirmed
from app.scripts import ScriptResult, Scripts, problem_from_script, unconfirmed_problem
from app.vocabulary import (
    CANCELLED,
    COMPLETED,
    OPEN,
    ORDER_FIELDS,
    decode_items,
    encode_items,
    new_order_id,
)

log = logging.getLogger("app.orders.saga")

# Settles one order's reservation on a phone partition after the answer is sent:
# (partition, order id, outcome, reserved lines); the Settler's settle_soon.
SettleSoon = Callable[[int, str, str, str], None]
# Told the phones a reserve has just set striped (docs/escrow.md, section 4), to grant
# their first stripes off the request path; the Refiller's stripe_everywhere.
OnStriped = Callable[[list[str]], None]


class PlaceOrder(Protocol):
    """POST /orders' order path as a worker's app runs it: ``place_order`` with what is
    the app's (its scripts, settler, refiller and settings) bound once at startup
    (app/orders/handlers.py: bind_order_path), called with what is the request's."""

    def __call__(
        self,
        *,
        customer_id: str,
        lines: list[tuple[str, int]],
        autocheck: bool,
        idempotency_key: str | None,
        request_id: str,
    ) -> Awaitable[PlacedOrder]: ...


def _now_ms() -> int:
    return int(time.time() * 1000)


# A reserve's refusals that say the order itself can no longer be placed (reserve_stock.lua),
# not that its lines cannot: answered 503, never merged into a 409.
TOO_LATE = frozenset({"order_expired", "order_released"})


# A short pool whose phone lent units to stripes (docs/escrow.md, section 5): the order path
# recalls them and tries again; never merged into a 409.
STOCK_LENT = "stock_lent"


def _is_stock_lent(outcome: ScriptResult | BaseException) -> bool:
    return isinstance(outcome, ScriptResult) and outcome.payload.get("code") == STOCK_LENT


async def _reserve_everywhere(
    scripts: Scripts,
    order_id: str,
    groups: dict[int, list[tuple[str, int]]],
    expires: int,
    fault_point: str,
    striping_rule: str = "",
) -> list[ScriptResult | BaseException]:
    """The reserves on every phone partition in parallel, in ``groups``' order. A
    partition that answered stock_lent holds nothing: its phones are recalled and it is
    reserved once more (the same order id and expiry). ``striping_rule``: ESCROW_STRIPES'
    (app/orders/grants.py), sent with every reserve."""
    outcomes = dict(
        zip(
            groups,
            await asyncio.gather(
                *(
                    saga.reserve(scripts, order_id, p, group, expires, striping_rule=striping_rule)
                    for p, group in groups.items()
                ),
                return_exceptions=True,
            ),
            strict=True,
        )
    )
    lent = [p for p, outcome in outcomes.items() if _is_stock_lent(outcome)]
    if lent:
        phone_ids = [
            phone_id
            for p in lent
            for phone_id in outcomes[p].payload["phone_ids"]  # type: ignore[union-attr]
        ]
        await recall.recall_all(scripts, phone_ids, fault_point)
        again = await asyncio.gather(
            *(
                saga.reserve(scripts, order_id, p, groups[p], expires, striping_rule=striping_rule)
                for p in lent
            ),
            return_exceptions=True,
        )
        outcomes.update(zip(lent, again, strict=True))
    return list(outcomes.values())


def _merged_refusal(refusals: list[ScriptResult]) -> tuple[int, dict[str, Any]]:
    """One answer for the lines every partition refused, with today's precedence:
    phone_not_found (all missing phones) before out_of_stock (all short lines)."""
    missing = [
        phone_id
        for result in refusals
        if result.payload.get("code") == "phone_not_found"
        for phone_id in result.payload["phone_ids"]
    ]
    if missing:
        return 404, {"code": "phone_not_found", "phone_ids": missing}
    short = [
        line
        for result in refusals
        if result.payload.get("code") == "out_of_stock"
        for line in result.payload["lines"]
    ]
    return 409, {"code": "out_of_stock", "lines": short}


def _settle_all(
    settle_soon: SettleSoon, order_id: str, outcome: str, reserved: dict[int, str]
) -> None:
    for partition, lines in reserved.items():
        settle_soon(partition, order_id, outcome, lines)


async def _release_now(scripts: Scripts, order_id: str, reserved: dict[int, str]) -> None:
    """An aborted order's units go back before its refusal is answered, so the next
    request sees them in stock (a 402 must not make the next order a 409). If this
    fails, the reservations stay due and the settler releases them."""
    outcomes = await asyncio.gather(
        *(
            saga.settle(scripts, partition, order_id, saga.ABORTED, lines)
            for partition, lines in reserved.items()
        ),
        return_exceptions=True,
    )
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            log.warning("releasing %s failed, left to the settler: %s", order_id, outcome)


async def _answer(scripts: Scripts, result: ScriptResult, autocheck: bool) -> PlacedOrder:
    """A commit's or a rejection's answer as the order path gives it."""
    if result.status >= 400:
        error = problem_from_script(result.status, result.payload)
        if result.flag:  # a stored rejection, replayed
            error.headers["Idempotent-Replayed"] = "true"
        raise error
    return await answered_order(scripts.gateway, result.payload, result.flag, autocheck)


async def place_order(
    scripts: Scripts,
    settle_soon: SettleSoon,
    *,
    customer_id: str,
    lines: list[tuple[str, int]],
    autocheck: bool,
    idempotency_key: str | None,
    idempotency_ttl: int,
    request_id: str,
    reservation_ttl_ms: int,
    fault_point: str = "",
    always_split: bool = False,
    striping_rule: str = "",
    on_striped: OnStriped | None = None,
) -> PlacedOrder:
    """``always_split`` (test-only, SAGA_ALWAYS_SPLIT; and the cost runs): the split
    saga even where one node serves every partition, so its steps and crash points can
    be reached on one redis-server. ``striping_rule`` (ESCROW_STRIPES): the reserves
    count apart orders and stripe a hot, deep phone; ``on_striped`` hears of it."""
    order_partition = partition_of(customer_id)
    order_id = new_order_id(customer_id, HINTS.current(order_partition))
    if not always_split:
        # The collapsed order, and once more after a recall when it answered stock_lent
        # (nothing was written; a second stock_lent is the client's 503: the settler
        # finishes the recall). One call site, no closure: this runs for every order (P1),
        # and a local function's object and cells were made per order.
        for recalled in (False, True):
            try:
                return await service.place_order(
                    scripts,
                    order_id=order_id,
                    customer_id=customer_id,
                    lines=lines,
                    autocheck=autocheck,
                    idempotency_key=idempotency_key,
                    idempotency_ttl=idempotency_ttl,
                    request_id=request_id,
                )
            except NotOnOneNode:
                break  # to stripes, else the split saga below
            except ProblemError as error:
                if recalled or error.code != STOCK_LENT:
                    raise
                await recall.recall_all(scripts, error.extra["phone_ids"], fault_point)
        order_id, placed = await _from_stripes(
            scripts,
            order_id=order_id,
            customer_id=customer_id,
            lines=lines,
            autocheck=autocheck,
            idempotency_key=idempotency_key,
            idempotency_ttl=idempotency_ttl,
            request_id=request_id,
        )
        if placed is not None:
            return placed
    groups = saga.lines_by_partition(lines)
    expires = _now_ms() + reservation_ttl_ms
    outcomes = await _reserve_everywhere(
        scripts, order_id, groups, expires, fault_point, striping_rule
    )
    reserved = {
        partition: result.payload["lines"]
        for partition, result in zip(groups, outcomes, strict=True)
        if isinstance(result, ScriptResult) and result.status == 200
    }
    if striping_rule and on_striped is not None:
        striped = [
            phone_id
            for result in outcomes
            if isinstance(result, ScriptResult)
            for phone_id in result.payload.get("striped", ())
        ]
        if striped:
            on_striped(striped)
    failed = [result for result in outcomes if isinstance(result, BaseException)]
    if failed:
        # This app will not commit: release what it holds and tombstone the rest, so a
        # reserve still on its way is refused. What this cannot reach, the settler does.
        everywhere = {partition: reserved.get(partition, "") for partition in groups}
        _settle_all(settle_soon, order_id, saga.ABORTED, everywhere)
        raise failed[0]
    crash_if("reserved", fault_point)

    record, idempotency = idempotency_request(
        customer_id, lines, autocheck, idempotency_key, idempotency_ttl
    )
    refusals = [result for result in outcomes if result.status != 200]
    if any(result.payload.get("code") == STOCK_LENT for result in refusals):
        # Still lent after a recall (it failed, or another stripe's units are on their way
        # home): answered 503 with nothing stored, as a too-late order is below.
        await _release_now(scripts, order_id, reserved)
        raise next(
            problem_from_script(result.status, result.payload)
            for result in refusals
            if result.payload.get("code") == STOCK_LENT
        )
    if any(result.payload.get("code") in TOO_LATE for result in refusals):
        # This request outlived its own expiry between minting and a reserve: a retry is
        # a new order. Nothing is stored for the Idempotency-Key and no commit will ever
        # be sent for this id (the expiry would refuse it anyway).
        await _release_now(scripts, order_id, reserved)
        raise retry_later("service_unavailable", 1, "The order took too long; retry it")
    if refusals:
        status, payload = _merged_refusal(refusals)
        result = await scripts.call(
            "reject_order",
            [
                keys.customer(customer_id),
                newest_bucket(customer_id, record),
                keys.aborts(order_partition),
                keys.aborts_due(order_partition),
                *older_buckets(customer_id, record),
            ],
            [
                order_id,
                *idempotency,
                status,
                msgspec.json.encode(payload).decode(),
                saga.keep_until(),
            ],
        )
        await _release_now(scripts, order_id, reserved)
        return await _answer(scripts, result, autocheck)

    prices = {
        line.phone_id: line.unit_price_cents
        for lines_of_partition in reserved.values()
        for line in decode_items(lines_of_partition)
    }
    items = encode_items([(phone_id, qty, prices[phone_id]) for phone_id, qty in lines])
    status = COMPLETED if autocheck else OPEN
    chunk = chunk_of(order_id)
    for _ in range(CHUNK_TRIES):
        result = await scripts.call(
            "commit_order",
            commit_order_keys(customer_id, order_id, status, record, chunk),
            [
                order_id,
                customer_id,
                _now_ms(),
                request_id,
                "1" if autocheck else "0",
                *idempotency,
                items,
                expires,
                saga.keep_until(),
                chunk,
            ],
        )
        if result.payload.get("code") != "order_chunk_stale":
            break
        # Nothing written: the id stays (the reserves hold it), the keys follow the chunk.
        chunk = int(result.payload["chunk"])
        HINTS.learn(order_partition, chunk)
    if "current_chunk" in result.payload:
        HINTS.learn(order_partition, int(result.payload["current_chunk"]))
    crash_if("committed", fault_point)
    # An order already there with a stripe mark was sold from stripes (a second guard: the
    # saga runs only after a stripe order was cleanly refused): its units are not these.
    if result.status == 201 and not result.flag and "stripe" not in result.payload:
        # Held units are not in stock either way: selling them can wait for a batch.
        _settle_all(settle_soon, order_id, saga.COMMITTED, reserved)
    else:
        await _release_now(scripts, order_id, reserved)
    return await _answer(scripts, result, autocheck)


async def _from_stripes(
    scripts: Scripts,
    *,
    order_id: str,
    customer_id: str,
    lines: list[tuple[str, int]],
    autocheck: bool,
    idempotency_key: str | None,
    idempotency_ttl: int,
    request_id: str,
) -> tuple[str, PlacedOrder | None]:
    """The order sold from stripes (docs/escrow.md 3) where this worker's hints say every
    line's phone is striped: place_from_stripe.lua on the customer's primary, its stripes
    in that primary's host partition. Returns the order id (minted again after a stale
    chunk) and the answer, or None when it was cleanly refused with nothing written
    (stripe_short, NotOnOneNode, no host on one redis-server): the split saga then places
    that id. A lost answer is sent again, never followed by the saga
    (stripes.place_from_stripe). Every line's answer is told to STRIPE_ANSWERS (the
    refills' hook)."""
    phone_ids = [phone_id for phone_id, _ in lines]
    if not STRIPE_HINTS.all_striped(phone_ids):
        return order_id, None  # every order of an unstriped phone: nothing more asked
    order_partition = partition_of(customer_id)
    host = scripts.gateway.host_partition(order_partition)
    if host is None or not STRIPE_HINTS.worth_trying(host, phone_ids):
        return order_id, None
    status = COMPLETED if autocheck else OPEN
    record, idempotency = idempotency_request(
        customer_id, lines, autocheck, idempotency_key, idempotency_ttl
    )
    for _ in range(CHUNK_TRIES):
        args: list[str | bytes | int] = [
            order_id,
            customer_id,
            _now_ms(),
            request_id,
            "1" if autocheck else "0",
            *idempotency,
            host,
        ]
        for phone_id, quantity in lines:
            args += [phone_id, quantity]
        script_keys = stripes.place_from_stripe_keys(
            customer_id, order_id, status, record, host, phone_ids
        )
        try:
            result = await stripes.place_from_stripe(scripts, script_keys, args)
        except NotOnOneNode:
            return order_id, None  # the host moved: nothing written
        except WriteUnconfirmed as error:
            raise unconfirmed_problem(error) from None
        if result.payload.get("code") != "order_chunk_stale":
            break
        chunk = int(result.payload["chunk"])  # nothing written: a new id for that chunk
        HINTS.learn(order_partition, chunk)
        order_id = new_order_id(customer_id, chunk)
    else:
        return order_id, None
    if "current_chunk" in result.payload:
        HINTS.learn(order_partition, int(result.payload["current_chunk"]))
    if result.payload.get("code") == stripes.STRIPE_SHORT:
        short = result.payload["phone_ids"]
        for phone_id in short:
            STRIPE_HINTS.ran_dry(host, phone_id)
        for phone_id in result.payload.get("closed", ()):
            STRIPE_HINTS.learn(phone_id, False)  # recalled: pool only until a receipt
        STRIPE_ANSWERS.tell([StripeAnswer(host, phone_id, None) for phone_id in short])
        return order_id, None
    if "stripe_left" in result.payload:
        STRIPE_ANSWERS.tell(
            [
                StripeAnswer(host, phone_id, int(left))
                for phone_id, left in result.payload["stripe_left"].items()
            ]
        )
    if result.status >= 400:
        error = problem_from_script(result.status, result.payload)
        if result.flag:  # a stored rejection, replayed
            error.headers["Idempotent-Replayed"] = "true"
        raise error
    return order_id, await answered_order(scripts.gateway, result.payload, result.flag, autocheck)


def commit_order_keys(
    customer_id: str, order_id: str, status: str, record: RecordPlace | None, chunk: int
) -> list[str]:
    """commit_order.lua's KEYS, in the order its header lists them: a new order's (in
    status chunk ``chunk``), the partition's abort markers (the fence) and their pruning
    list, the chunk's directory, counts and state, then the older Idempotency-Key
    buckets."""
    partition = partition_of(order_id)
    return [
        *new_order_keys(customer_id, order_id, status, record, chunk),
        keys.aborts(partition),
        keys.aborts_due(partition),
        *chunk_entry_keys(partition, status, chunk),
        *older_buckets(customer_id, record),
    ]


def refund_order_keys(order_id: str, owner_id: str, chunk: int) -> list[str]:
    """refund_order.lua's KEYS, in the order its header lists them (the order's partition)."""
    partition = partition_of(order_id)
    return [
        *cancel_keys(order_id, owner_id, chunk),
        keys.take_backs_due(partition),
        *chunk_move_keys(partition, OPEN, CANCELLED, chunk),
    ]


async def _refuse_a_give_back_past_the_ceiling(gateway: RedisGateway, items: str) -> None:
    """Today's cancel refuses up front a restock that would cross the stock ceiling; the
    phones are on other partitions than the refund, so this reads them first. A restock
    reaching the ceiling in between leaves the give-back refused and due (logged by the
    settler), never more stock than the ceiling."""
    lines = decode_items(items)
    stocks = await gateway.execute_many(
        [("HGET", keys.phone(line.phone_id), "stock") for line in lines]
    )
    for line, stock in zip(lines, stocks, strict=True):
        if int(stock or 0) + line.quantity > STOCK_LIMIT:
            raise ProblemError(
                "stock_limit", stock=int(stock or 0), limit=STOCK_LIMIT, phone_id=line.phone_id
            )


async def _read_order(
    gateway: RedisGateway, principal: Principal, order_id: str
) -> tuple[str, str, str | None]:
    """The order's owner, items and stripe mark (None unless sold from stripes); 404 when
    it is not there or not the requester's."""
    if principal.customer_id is not None and (
        partition_of(order_id) != partition_of(principal.customer_id)
    ):
        raise ProblemError("order_not_found")  # a customer's orders are in its partition
    owner, items, mark = await gateway.hmget(
        keys.order(order_id),
        [ORDER_FIELDS["customer_id"], ORDER_FIELDS["items"], ORDER_FIELDS["stripe"]],
    )
    if owner is None or (not principal.is_admin and owner.decode() != principal.customer_id):
        raise ProblemError("order_not_found")
    return owner.decode(), items.decode(), None if mark is None else mark.decode()


async def cancel_order(
    gateway: RedisGateway,
    scripts: Scripts,
    principal: Principal,
    order_id: str,
    request_id: str,
    take_back_after_ms: int,
    fault_point: str = "",
    always_split: bool = False,
) -> Order:
    """The order's owner and items are read first (one round trip): every key the cancel
    touches is named from them (app/keys.py) and passed in KEYS. Collapsed: one
    cancel_order script where one node serves every partition of the order (always on
    one redis-server; on a cluster by redis-py's slot map, with nothing sent where not)
    and none still holds its reservation (a split order's settle not yet run: the
    script says so and writes nothing). Split: refund on the order's partition, then
    give each phone partition its units back; the settler's take-back list covers a
    death in between. An order sold from stripes (its stripe mark) gives its units back
    to them (app/orders/stripe_cancel.py), or to the pools if they closed since."""
    owner_id, items_field, mark = await _read_order(gateway, principal, order_id)
    if not always_split:
        with contextlib.suppress(NotOnOneNode):
            if mark is None:
                cancelled = await service.cancel_on_one_node(
                    scripts, principal, order_id, owner_id, items_field, request_id
                )
            else:
                cancelled = await stripe_cancel.cancel_on_one_node(
                    scripts, principal, order_id, owner_id, items_field, mark, request_id, _now_ms()
                )
            if cancelled is not None:
                return cancelled
    # The split cancel's give-back settles a reservation still held before giving the
    # units back (return_stock.lua), so it needs no look at the reservations first.
    await _refuse_a_give_back_past_the_ceiling(gateway, items_field)
    order_partition = partition_of(order_id)
    now = _now_ms()
    args: list[str | bytes | int] = [
        owner_id,
        principal.customer_id or "",
        now,
        request_id,
        BALANCE_LIMIT,
        now + take_back_after_ms,  # the request gives it back; this is for a dead app
    ]
    result = await service.in_chunk(
        lambda chunk: scripts.run(
            "refund_order", refund_order_keys(order_id, owner_id, chunk), [*args, chunk]
        ),
        order_id,
    )
    crash_if("refunded", fault_point)
    if mark is not None:
        given_back = await stripe_cancel.give_back(scripts, order_id, items_field, mark)
    else:
        returned = await asyncio.gather(
            *(
                saga.return_stock(scripts, partition, order_id, lines)
                for partition, lines in saga.items_by_partition(items_field).items()
            )
        )
        given_back = all(answer.status == 200 for answer in returned)
    if given_back:
        await gateway.execute("ZREM", keys.take_backs_due(order_partition), order_id)
    return order_from_fields(result.payload)
