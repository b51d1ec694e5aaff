"""The Lua scripts, read once from ``lua/*.lua`` and run through the Redis
gateway (app/redis_gateway.py), which times them and reloads after NOSCRIPT.

Each is sent with the part of app/lua_prelude.py's prelude it uses before it
(the words of app/vocabulary.py, the helpers the scripts share), and its SHA1
is taken over the two.

Every script answers ``{http_status, payload_json, ...}``; ``run`` turns an
error status into the matching ``ProblemError`` so handlers never see raw
replies.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import msgspec

from app.lua_prelude import across_slots, with_prelude
from app.problems import PROBLEMS, ProblemError, retry_later
from app.redis_gateway import LuaScript, RedisGateway, WriteUnconfirmed

SCRIPT_NAMES = (
    "place_order",
    "check_order",
    "cancel_order",
    "create_phone",
    "update_phone",
    "restock",
    "create_customer",
    "deposit",
    # The reservation saga (docs/data-tier.md, section 3).
    "reserve_stock",
    "settle_reservation",
    "fence_orders",
    "return_stock",
    "commit_order",
    "reject_order",
    "refund_order",
    "prune_tombstones",
    # Escrow's grants (docs/escrow.md, section 4).
    "reserve_grant",
    # Escrow (docs/escrow.md): a price change written to a stripe, a stripe order's
    # split cancel's give-back.
    "reprice_stripe",
    "return_to_stripe",
    # Escrow (docs/escrow.md): a grant's receipt on its stripe host.
    "receive_grant",
    # Escrow's recall (docs/escrow.md, section 5).
    "drain_phone",
    "close_stripe",
    "receive_shipments",
    # Escrow: an order sold from stripes (docs/escrow.md, section 3).
    "place_from_stripe",
)


# The saga's steps, idempotent by order id (docs/data-tier.md, 3.5): a second run finds
# its own first run's record and answers the same. The cluster gateway sends these again
# after a connection that broke once they were sent; never the others (a deposit or a
# restock run twice adds twice; a cancel run twice answers 409 to a cancel that worked).
RERUNNABLE = frozenset(
    {
        "reserve_stock",
        "settle_reservation",
        "fence_orders",
        "return_stock",
        "commit_order",
        "reject_order",
        "prune_tombstones",
        "reserve_grant",
        "reprice_stripe",
        "return_to_stripe",
        "receive_grant",
        "drain_phone",
        "close_stripe",
        "receive_shipments",
        # Idempotent by order id (a second run finds the order and answers it): after a
        # lost answer the order path sends it again, never the saga (docs/escrow.md 3).
        "place_from_stripe",
    }
)


# The scripts whose keys span partitions: the order path's collapsed forms (the saga in
# one script: app/orders/saga_service.py), run only where one node serves every key.
ONE_NODE_SCRIPTS = ("place_order", "cancel_order", "place_from_stripe")


def _text(name: str) -> str:
    return resources.files("app").joinpath("lua", f"{name}.lua").read_text()


def load_source(name: str) -> str:
    """The script as Redis runs it: with the prelude."""
    return with_prelude(_text(name))


def load_across_slots_source(name: str) -> str:
    """The same script as a Redis Cluster node runs it over several of its slots
    (app/lua_prelude.py's ``across_slots``)."""
    return across_slots(_text(name))


# A Struct, not a frozen dataclass: one per script call, and a frozen dataclass's
# __init__ (object.__setattr__ per field) costs about six times a Struct's (P1).
class ScriptResult(msgspec.Struct, frozen=True):
    status: int
    payload: dict[str, Any]
    # Third reply element: place_order's "replayed", check/cancel's "changed".
    flag: bool
    raw_payload: bytes
    # Fourth reply element, decoded, where a script answers one (update_phone's
    # stripes to reprice); None otherwise.
    more: Any = None


class Scripts:
    """One loaded script per money-or-stock operation, run through the gateway."""

    def __init__(self, gateway: RedisGateway) -> None:
        self._gateway = gateway
        self._scripts = {
            name: LuaScript.of(name, load_source(name), rerunnable=name in RERUNNABLE)
            for name in SCRIPT_NAMES
        }
        self._across_slots = {
            name: LuaScript.of(name, load_across_slots_source(name), rerunnable=name in RERUNNABLE)
            for name in ONE_NODE_SCRIPTS
        }

    def _every_form(self) -> list[LuaScript]:
        return [*self._scripts.values(), *self._across_slots.values()]

    async def load(self) -> None:
        """SCRIPT LOAD every script so /readyz can tell they are there."""
        for script in self._every_form():
            await self._gateway.execute("SCRIPT", "LOAD", script.source)

    async def loaded(self) -> bool:
        """Over the connection the orders use: ready must mean they can run."""
        shas = [script.sha for script in self._every_form()]
        return all(await self._gateway.execute("SCRIPT", "EXISTS", *shas))

    @property
    def gateway(self) -> RedisGateway:
        """The gateway the scripts run through, for a read that completes an answer
        (a replayed Idempotency-Key's order, app/orders/service.py)."""
        return self._gateway

    @property
    def connection(self) -> object | None:
        """The connection the scripts run over, as the gateway's opaque token."""
        return self._gateway.connection

    async def call(
        self, name: str, keys: list[str], args: list[str | bytes | int], *, one_node: bool = False
    ) -> ScriptResult:
        """The script's answer as it is, refusals included: for callers (the saga's
        steps) that act on a refusal instead of answering it to a client. A write its
        replica did not confirm raises WriteUnconfirmed (app/redis_gateway.py).
        ``one_node``: one of ONE_NODE_SCRIPTS, run only where one node serves every key,
        else NotOnOneNode and nothing ran (RedisGateway.run_on_one_node)."""
        script = self._scripts[name]
        if one_node:
            reply = await self._gateway.run_on_one_node(
                script, self._across_slots[name], keys, args
            )
        else:
            reply = await self._gateway.run_script(script, keys, args)
        status = int(reply[0])
        raw = reply[1] if isinstance(reply[1], bytes) else str(reply[1]).encode()
        payload = msgspec.json.decode(raw)
        more = msgspec.json.decode(reply[3]) if len(reply) > 3 else None
        return ScriptResult(status, payload, len(reply) > 2 and int(reply[2]) == 1, raw, more)

    async def run(
        self, name: str, keys: list[str], args: list[str | bytes | int], *, one_node: bool = False
    ) -> ScriptResult:
        try:
            result = await self.call(name, keys, args, one_node=one_node)
        except WriteUnconfirmed as error:
            raise unconfirmed_problem(error) from None
        if result.status >= 400 and not result.flag:
            raise problem_from_script(result.status, result.payload)
        return result


def unconfirmed_problem(error: WriteUnconfirmed) -> ProblemError:
    """503 + Retry-After for a write its replica did not confirm: never a silent
    success. It names the order the script placed, when it placed one, so the
    client can also look it up."""
    problem = retry_later(
        "write_unconfirmed",
        1,
        "The change was applied but its copy on a replica is not confirmed. Retry the "
        "same request with the same Idempotency-Key: it is answered as the first one was "
        "if the change survived, and made again if it did not.",
    )
    order_id = _placed_order_id(error.script, error.reply)
    if order_id is not None:
        problem.extra["order_id"] = order_id
    return problem


# The scripts whose success places an order: place_order, and the saga's commit point.
PLACING_SCRIPTS = ("place_order", "commit_order", "place_from_stripe")


def _placed_order_id(script: str, reply: Any) -> str | None:
    if script not in PLACING_SCRIPTS or not isinstance(reply, list) or len(reply) < 2:
        return None
    try:
        payload = msgspec.json.decode(reply[1])
    except (msgspec.DecodeError, TypeError):
        return None
    # A replay names the order it answers (app/lua_prelude.py: replay_reply).
    order_id = payload.get("id", payload.get("replay_of")) if isinstance(payload, dict) else None
    return order_id if isinstance(order_id, str) and int(reply[0]) < 400 else None


def problem_from_script(status: int, payload: dict[str, Any]) -> ProblemError:
    """The domain error a script's rejection stands for, with its figures."""
    code = payload.get("code", "internal_error")
    match code:
        case "phone_not_found" if "phone_ids" in payload:
            ids = payload["phone_ids"]
            return ProblemError(code, f"No phone with id {', '.join(ids)}", phone_ids=ids)
        case "out_of_stock":
            lines = [
                {
                    "phone_id": line["phone_id"],
                    "requested": int(line["requested"]),
                    "available": int(line["available"]),
                }
                for line in payload["lines"]
            ]
            detail = "; ".join(
                f"phone {line['phone_id']}: requested {line['requested']}, {line['available']} left"
                for line in lines
            )
            return ProblemError(code, detail, lines=lines)
        case "insufficient_funds":
            balance, total = int(payload["balance_cents"]), int(payload["total_cents"])
            return ProblemError(
                code,
                f"The order costs {total} cents and the balance is {balance} cents",
                balance_cents=balance,
                total_cents=total,
            )
        case "stock_lent":
            # The order path recalls these phones' stripes and tries again
            # (app/orders/recall.py); a client sees it only when that could not finish.
            error = retry_later(code, 1)
            error.extra["phone_ids"] = payload["phone_ids"]
            return error
        case "stock_limit":
            figures = {"stock": int(payload["stock"]), "limit": int(payload["limit"])}
            if "phone_id" in payload:  # a cancel's restock names the line
                figures["phone_id"] = payload["phone_id"]
            return ProblemError(code, **figures)
        case "balance_limit":
            return ProblemError(
                code, balance_cents=int(payload["balance_cents"]), limit=int(payload["limit"])
            )
        case "order_chunk_stale" | "order_chunk_moved":
            # The app retries these with the chunk they name (app/orders/service.py).
            return ProblemError(code, chunk=int(payload["chunk"]))
        case _ if code in PROBLEMS:
            # The one table in app/problems.py knows every code a script may answer.
            return ProblemError(code)
    return ProblemError("internal_error", f"script answered {status} {code}")
