"""The Lua scripts, loaded once from ``lua/*.lua`` and registered with redis-py.

Every script answers ``{http_status, payload_json, ...}``; ``run`` turns an
error status into the matching ``ProblemError`` so handlers never see raw
replies.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from app.fastredis import MultiplexedRedis
from app.problems import PROBLEMS, ProblemError

SCRIPT_NAMES = (
    "place_order",
    "check_order",
    "cancel_order",
    "create_phone",
    "update_phone",
    "restock",
    "create_customer",
    "deposit",
)


def load_source(name: str) -> str:
    return resources.files("app").joinpath("lua", f"{name}.lua").read_text()


@dataclass(frozen=True, slots=True)
class ScriptResult:
    status: int
    payload: dict[str, Any]
    # Third reply element: place_order's "replayed", check/cancel's "changed".
    flag: bool
    raw_payload: bytes


class Scripts:
    """One registered script per money-or-stock operation."""

    def __init__(self, redis: Redis, fast: MultiplexedRedis | None = None) -> None:
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(load_source(name)) for name in SCRIPT_NAMES
        }
        # The hot path: EVALSHA over one multiplexed connection when given
        # (app/fastredis.py), else through redis-py's pool.
        self._fast = fast

    async def load(self) -> None:
        """SCRIPT LOAD every script so /readyz can tell they are there."""
        for script in self._scripts.values():
            await script.registered_client.script_load(script.script)

    async def loaded(self) -> bool:
        shas = [script.sha for script in self._scripts.values()]
        if self._fast is not None:
            # Over the connection the orders use: ready must mean they can run.
            return all(await self._fast.execute("SCRIPT", "EXISTS", *shas))
        client = next(iter(self._scripts.values())).registered_client
        return all(await client.script_exists(*shas))

    @property
    def fast(self) -> MultiplexedRedis | None:
        """The multiplexed connection, for other hot reads (the list pages)."""
        return self._fast

    async def _call(self, script: AsyncScript, keys: list[str], args: list[str | int]) -> Any:
        if self._fast is None:
            return await script(keys=keys, args=args)
        try:
            return await self._fast.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            # Redis restarted without its script cache (or was flushed): load it again.
            await self._fast.execute("SCRIPT", "LOAD", script.script)
            return await self._fast.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    async def run(self, name: str, keys: list[str], args: list[str | int]) -> ScriptResult:
        reply = await self._call(self._scripts[name], keys, args)
        status = int(reply[0])
        raw = reply[1] if isinstance(reply[1], bytes) else str(reply[1]).encode()
        payload = msgspec.json.decode(raw)
        result = ScriptResult(status, payload, len(reply) > 2 and int(reply[2]) == 1, raw)
        if status >= 400 and not result.flag:
            raise problem_from_script(status, payload)
        return result


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
        case "stock_limit":
            figures = {"stock": int(payload["stock"]), "limit": int(payload["limit"])}
            if "phone_id" in payload:  # a cancel's restock names the line
                figures["phone_id"] = payload["phone_id"]
            return ProblemError(code, **figures)
        case "balance_limit":
            return ProblemError(
                code, balance_cents=int(payload["balance_cents"]), limit=int(payload["limit"])
            )
        case _ if code in PROBLEMS:
            # The one table in app/problems.py knows every code a script may answer.
            return ProblemError(code)
    return ProblemError("internal_error", f"script answered {status} {code}")
