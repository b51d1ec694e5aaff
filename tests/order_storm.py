"""A bounded storm of orders through a stack, as clients send it, and the books afterwards:
what the fault tests share (tests/test_faults.py on one redis-server,
tests/test_cluster_failover.py on the cluster).

``order_storm`` records what every client was told (``Storm``); ``check_books`` then
requires every acknowledged order to be stored with the status its client was last
told, and the audit over every partition to hold at rest."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from app.ops.poll import wait_until_async
from loadtests.support.stack import FullStack
from tests.helpers import REST_DEADLINE

CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=15)
# The stack's settings for a storm: the rate limits out of the way (the storm is the
# load, not an abuser), and a request waits at most REDIS_TIMEOUT for a Redis that is away.
STORM_ENV = {
    "LIMIT_WRITE_RATE": "100000r/s",
    "LIMIT_WRITE_BURST": "100000",
    "LIMIT_READ_RATE": "100000r/s",
    "LIMIT_READ_BURST": "100000",
    "LIMIT_CONN": "5000",
    "REDIS_TIMEOUT": "1",
    "MAX_INFLIGHT": "64",
}
PRICE_CENTS = 100
BALANCE_CENTS = 10**8
# Answers that settle a request: the client stops retrying it.
PLACED_FOR_GOOD = (201, 402, 409, 422)
CHANGED_FOR_GOOD = (200, 404, 409)


async def call(
    session: aiohttp.ClientSession, method: str, url: str, **kwargs
) -> tuple[int, dict, str]:
    async with session.request(method, url, **kwargs) as response:
        text = await response.text()
        body = json.loads(text) if text.startswith("{") else {}
        return response.status, body, response.content_type


@dataclass
class Shoppers:
    """What ``provision`` made: phone ids, and each customer's id and token header."""

    phones: list[str]
    customer_ids: list[str]
    tokens: list[dict[str, str]]


async def provision(
    session: aiohttp.ClientSession,
    stack: FullStack,
    customers: int,
    stock: int,
    *,
    emails: list[str] | None = None,
) -> Shoppers:
    """Three phones and ``customers`` customers (``emails``, or fresh ones), set up
    through one instance directly (no rate limit in the way)."""
    url, admin = stack.direct_url, stack.admin_headers
    phones = []
    for i in range(3):
        status, body, _ = await call(
            session,
            "POST",
            f"{url}/phones",
            json={"name": f"storm {i}", "price_cents": PRICE_CENTS, "stock": stock},
            headers=admin,
        )
        assert status == 201
        phones.append(body["phone"]["id"])
    shoppers = Shoppers(phones, [], [])
    for email in emails or [f"{uuid.uuid4().hex}@example.com" for _ in range(customers)]:
        status, body, _ = await call(
            session,
            "POST",
            f"{url}/customers",
            json={"name": "C", "surname": "Haos", "email": email, "balance_cents": BALANCE_CENTS},
            headers=admin,
        )
        assert status == 201
        shoppers.customer_ids.append(body["customer"]["id"])
        shoppers.tokens.append({"Authorization": f"Bearer {body['token']}"})
    return shoppers


@dataclass(frozen=True)
class Ack:
    """One 201: when its (last) try was sent and answered, which order, which phone."""

    sent: float
    answered: float
    order_id: str
    phone_id: str
    customer: int  # index into Shoppers


@dataclass
class Storm:
    """What the clients were told."""

    statuses: Counter = field(default_factory=Counter)
    acked: dict[str, str] = field(default_factory=dict)  # idempotency key -> order id
    acks: list[Ack] = field(default_factory=list)
    # Order id -> the status its client was last told (open, completed, cancelled).
    told: dict[str, str] = field(default_factory=dict)
    problems_503: int = 0
    # The ``code`` of every 5xx problem+json answer.
    problem_codes: Counter = field(default_factory=Counter)
    # Every 5xx but a 503, with its request and detail: a 500 is a defect to explain.
    server_errors: list[str] = field(default_factory=list)
    non_problem_errors: list[str] = field(default_factory=list)
    client_timeouts: int = 0
    connection_errors: int = 0


async def order_storm(
    session: aiohttp.ClientSession,
    url: str,
    shoppers: Shoppers,
    until: asyncio.Event,
    storm: Storm,
    *,
    retry_with_key: bool = False,
    lifecycle: bool = False,
) -> None:
    """Each customer places orders until ``until`` is set. With retry_with_key,
    an unanswered or 5xx request is sent again (an order with the same
    Idempotency-Key) until it gets a definitive answer, as a careful client does.

    Without ``lifecycle`` every order stays open. With it (and retry_with_key), a third
    are placed completed (autocheck), a third placed open then checked, a third placed
    open then cancelled."""
    assert retry_with_key or not lifecycle, "a life cycle needs each step settled"
    phones = shoppers.phones

    async def once(method: str, path: str, **kwargs) -> tuple[int, dict]:
        try:
            status, answer, content_type = await call(session, method, f"{url}{path}", **kwargs)
        except TimeoutError:
            storm.client_timeouts += 1
            status, answer, content_type = 0, {}, ""
        except aiohttp.ClientError:
            storm.connection_errors += 1
            status, answer, content_type = 0, {}, ""
        storm.statuses[status] += 1
        if status >= 500:
            if content_type == "application/problem+json":
                storm.problems_503 += status == 503
                storm.problem_codes[answer.get("code")] += 1
                if status != 503:
                    storm.server_errors.append(f"{status} {method} {path}: {answer.get('detail')}")
            else:
                storm.non_problem_errors.append(f"{status} {content_type}")
        return status, answer

    async def settled(
        method: str, path: str, definitive: tuple[int, ...], **kwargs
    ) -> tuple[int, dict, float]:
        """The request, tried again until ``definitive`` (with retry_with_key); its
        last answer and when that try was sent."""
        while True:
            sent = time.monotonic()
            status, answer = await once(method, path, **kwargs)
            if status in definitive or not retry_with_key:
                return status, answer, sent
            # Pacing the retries, as a client backs off (longer once the storm is
            # over and nothing answers): not synchronisation.
            await asyncio.sleep(0.05)
            if until.is_set() and status == 0:
                await asyncio.sleep(0.5)

    async def customer(index: int, headers: dict[str, str]) -> None:
        n = 0
        while not until.is_set():
            key = f"{index}-{n}-{uuid.uuid4().hex[:8]}"
            n += 1
            phone_id = phones[n % len(phones)]
            step = n % 3 if lifecycle else 1
            body = {"items": [{"phone_id": phone_id, "quantity": 1}], "autocheck": step == 0}
            status, answer, sent = await settled(
                "POST",
                "/orders",
                PLACED_FOR_GOOD,
                json=body,
                headers={**headers, "Idempotency-Key": key},
            )
            if status != 201:
                continue
            order_id = answer["order"]["id"]
            storm.acked[key] = order_id
            storm.acks.append(Ack(sent, time.monotonic(), order_id, phone_id, index))
            storm.told[order_id] = answer["order"]["status"]
            if step == 0 or not lifecycle:
                continue
            change = "check" if step == 1 else "cancel"
            status, answer, _ = await settled(
                "POST", f"/orders/{order_id}/{change}", CHANGED_FOR_GOOD, headers=headers
            )
            if status == 200:
                storm.told[order_id] = answer["order"]["status"]

    await asyncio.gather(*(customer(i, headers) for i, headers in enumerate(shoppers.tokens)))


async def read(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    """GET ``url`` as a client reads after a fault: a 503 (with Retry-After) is tried
    again, as the answer asks, until another answer comes."""

    async def answered() -> tuple[int, dict] | None:
        status, body, _ = await call(session, "GET", url, headers=headers)
        return None if status == 503 else (status, body)

    return await wait_until_async(answered, f"an answer but 503 from {url}", REST_DEADLINE)


async def audit_at_rest(session: aiohttp.ClientSession, stack: FullStack) -> dict:
    """The audit over every partition once it ran at rest: on the cluster the saga
    settles its reservations just after the answers."""

    async def audit_if_at_rest() -> dict | None:
        status, audit = await read(
            session, f"{stack.direct_url}/admin/audit", headers=stack.admin_headers
        )
        assert status == 200, audit
        return audit if audit["at_rest"] else None

    return await wait_until_async(audit_if_at_rest, "an audit at rest", REST_DEADLINE)


async def check_books(session: aiohttp.ClientSession, stack: FullStack, storm: Storm) -> dict:
    """Every acknowledged order is stored with the status its client was last told,
    and the audit holds at rest."""
    url, admin = stack.direct_url, stack.admin_headers
    for order_id in storm.acked.values():
        status, body = await read(session, f"{url}/orders/{order_id}", headers=admin)
        assert status == 200, f"acknowledged order {order_id} is missing"
        assert body["order"]["status"] == storm.told[order_id], body["order"]
    audit = await audit_at_rest(session, stack)
    assert audit["ok"], audit
    return audit
