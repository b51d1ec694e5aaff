"""After the storm: is the shop still correct, and was every client told the truth?

    python -m loadtests.verify --ledger loadtests/reports/ledger.json \\
        [--host URL] [--redis-url redis://127.0.0.1:6390/0] [--mail-timeout 120]

Reads the ledger the locustfile wrote when Locust quit (every acknowledged
order, what its owner was last told about it, the provisioned customers and
their opening balances) and checks, through the admin API:

1. ``GET /admin/audit`` is ok: stock and money conservation hold, no negative
   stock or balance;
2. the orders stored for the run's customers are exactly the acknowledged
   ones: none missing, and none extra beyond the requests whose outcome the
   client never learned (``unresolved_orders``, normally 0);
3. every order's stored status is the one its owner was last told;
4. every run customer's balance is the opening balance minus the totals of
   their open and completed orders;
5. with ``--redis-url`` (the mail worker running): every completed order of
   the run has a sent mail (``keys.mail_sent``) or a dead letter in its
   partition's dead-letter stream, waiting up to ``--mail-timeout`` seconds for the
   worker to catch up.

Exits 0 when everything holds, 1 otherwise; ``--out`` writes the result as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

from app import keys
from app.partitions import PARTITIONS
from app.vocabulary import COMPLETED, MONEY_KEEPING_STATUSES

CONCURRENCY = 8


class Api:
    def __init__(self, session: aiohttp.ClientSession, base: str, token: str) -> None:
        self.session = session
        self.base = base.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}
        self.gate = asyncio.Semaphore(CONCURRENCY)

    async def get(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """GET with the admin token; waits out 429/503 with Retry-After."""
        for _ in range(20):
            async with (
                self.gate,
                self.session.get(self.base + path, params=params, headers=self.headers) as r,
            ):
                if r.status == 200:
                    return await r.json()
                if r.status in (429, 503):
                    # Back off as Retry-After asks (capped), as a client does: pacing.
                    await asyncio.sleep(min(2.0, float(r.headers.get("Retry-After") or 1)))
                    continue
                raise RuntimeError(f"GET {path} {params or ''}: {r.status} {await r.text()}")
        raise RuntimeError(f"GET {path}: still refused after 20 attempts")

    async def customer_orders(self, customer_id: str) -> list[dict[str, Any]]:
        orders, page = [], 1
        while True:
            body = await self.get(
                "/orders", {"customer_id": customer_id, "per_page": 100, "page": page}
            )
            orders += body["orders"]
            if page >= body["pageCount"]:
                return orders
            page += 1


async def check_mail(redis_url: str, completed: list[str], wait_seconds: float) -> dict[str, Any]:
    """Wait until every completed order has a sent marker or a dead letter."""
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        deadline = time.monotonic() + wait_seconds
        waiting = set(completed)
        dead: set[str] = set()
        sent = 0
        last_dead_ids = dict.fromkeys(range(PARTITIONS), "-")  # per partition's md{P}
        while True:
            ids = sorted(waiting)
            for start in range(0, len(ids), 1000):
                chunk = ids[start : start + 1000]
                async with redis.pipeline(transaction=False) as pipe:
                    for order_id in chunk:
                        pipe.exists(keys.mail_sent(order_id))
                    found = await pipe.execute()
                for order_id, exists in zip(chunk, found, strict=True):
                    if exists:
                        waiting.discard(order_id)
                        sent += 1
            # Dead letters, read incrementally, partition by partition.
            for partition, last_dead_id in last_dead_ids.items():
                dead_key = keys.mail_dead(partition)
                start = "-" if last_dead_id == "-" else f"({last_dead_id}"
                entries = await redis.xrange(dead_key, min=start, count=100_000)
                for entry_id, fields in entries:
                    last_dead_ids[partition] = entry_id
                    order_id = fields.get("order_id", "")
                    if order_id in waiting:
                        waiting.discard(order_id)
                        dead.add(order_id)
            if not waiting or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.5)  # polling the mail state, bounded by the deadline
        return {
            "ok": not waiting,
            "completed_orders": len(completed),
            "mailed": sent,
            "dead_lettered": len(dead),
            "without_mail": len(waiting),
            "examples_without_mail": sorted(waiting)[:10],
        }
    finally:
        await redis.aclose()


async def verify(
    ledger: dict[str, Any],
    host: str,
    token: str,
    redis_url: str | None = None,
    mail_timeout: float = 120.0,
) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        api = Api(session, host, token)
        audit = await api.get("/admin/audit")
        customers = ledger["customers"]
        stored_lists = await asyncio.gather(*(api.customer_orders(c["id"]) for c in customers))
        balances = await asyncio.gather(*(api.get(f"/customers/{c['id']}") for c in customers))

    acked: dict[str, dict[str, Any]] = ledger["orders"]
    stored: dict[str, dict[str, Any]] = {}
    wrong_owner = []
    for customer, orders in zip(customers, stored_lists, strict=True):
        for order in orders:
            stored[order["id"]] = order
            if order["customer_id"] != customer["id"]:
                wrong_owner.append(order["id"])
    missing = sorted(set(acked) - set(stored))
    extra = sorted(set(stored) - set(acked))
    unresolved = int(ledger.get("unresolved_orders", 0))

    status_mismatches = []
    for order_id, told in acked.items():
        order = stored.get(order_id)
        if order is None or told["status"] == "unknown":
            continue
        if order["status"] != told["status"] or order["total_cents"] != told["total_cents"]:
            status_mismatches.append(
                {
                    "order_id": order_id,
                    "told": told["status"],
                    "stored": order["status"],
                    "told_total": told["total_cents"],
                    "stored_total": order["total_cents"],
                }
            )

    balance_mismatches = []
    live_by_customer: dict[str, int] = {}
    for order in stored.values():
        if order["status"] in MONEY_KEEPING_STATUSES:
            live_by_customer[order["customer_id"]] = (
                live_by_customer.get(order["customer_id"], 0) + order["total_cents"]
            )
    for customer, body in zip(customers, balances, strict=True):
        expected = customer["balance_cents"] - live_by_customer.get(customer["id"], 0)
        actual = body["customer"]["balance_cents"]
        if actual != expected or actual < 0:
            balance_mismatches.append(
                {"customer_id": customer["id"], "expected": expected, "actual": actual}
            )

    statuses: dict[str, int] = {}
    for order in stored.values():
        statuses[order["status"]] = statuses.get(order["status"], 0) + 1
    checks: dict[str, Any] = {
        "audit": {
            "ok": bool(audit.get("ok"))
            and not audit.get("negative_stock")
            and not audit.get("negative_balances"),
            "stock_ok": audit["stock"]["ok"],
            "money_ok": audit["money"]["ok"],
            "negative_stock": audit.get("negative_stock", []),
            "negative_balances": audit.get("negative_balances", []),
            "orders": audit.get("orders"),
        },
        "orders": {
            "ok": not missing and len(extra) <= unresolved and not wrong_owner,
            "acknowledged": len(acked),
            "stored_for_run": len(stored),
            "unresolved_requests": unresolved,
            "missing": missing[:20],
            "missing_count": len(missing),
            "extra": extra[:20],
            "extra_count": len(extra),
            "wrong_owner": wrong_owner[:20],
            "stored_statuses": statuses,
        },
        "statuses": {"ok": not status_mismatches, "mismatches": status_mismatches[:20]},
        "balances": {
            "ok": not balance_mismatches,
            "customers": len(customers),
            "mismatches": balance_mismatches[:20],
        },
    }
    if redis_url:
        completed = [oid for oid, order in stored.items() if order["status"] == COMPLETED]
        checks["mail"] = await check_mail(redis_url, completed, mail_timeout)
    return {"ok": all(check["ok"] for check in checks.values()), "checks": checks}


def render(result: dict[str, Any]) -> str:
    lines = [f"verify: {'OK' if result['ok'] else 'FAILED'}"]
    for name, check in result["checks"].items():
        details = {k: v for k, v in check.items() if k != "ok" and v not in ([], None)}
        lines.append(f"  {name:9} {'ok' if check['ok'] else 'FAILED'}  {json.dumps(details)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.verify", description=__doc__)
    parser.add_argument("--ledger", type=Path, default=Path("loadtests/reports/ledger.json"))
    parser.add_argument("--host", help="the API's base URL (default: the ledger's host)")
    parser.add_argument("--admin-token", default=os.environ.get("ADMIN_TOKEN", ""))
    parser.add_argument("--redis-url", help="check mails too (the mail worker must be running)")
    parser.add_argument("--mail-timeout", type=float, default=120.0)
    parser.add_argument("--out", type=Path, help="write the result here as JSON")
    args = parser.parse_args(argv)
    if not args.admin_token:
        parser.error("--admin-token or ADMIN_TOKEN is required")
    ledger = json.loads(args.ledger.read_text())
    host = args.host or ledger.get("host")
    if not host:
        parser.error("--host is required (the ledger names none)")
    result = asyncio.run(verify(ledger, host, args.admin_token, args.redis_url, args.mail_timeout))
    print(render(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
