"""PhoneShop traffic for Locust: customers who browse, look, order, check, cancel.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8080   (options: locust.conf)

At test start the admin API provisions phones and customers (``--setup-host``
may name one app instance directly, so set-up is not throttled by nginx's
per-token write limit). A few phones have little stock and some customers
little money, so 409 out_of_stock and 402 insufficient_funds happen on purpose.

Every request uses ``catch_response`` and is classified:

* the expected 2xx with a well-formed JSON body: success;
* a business answer (402, 409 with a known problem code): success;
* shedding (429, or 503 with Retry-After): success, reported under the name
  ``[shed] <name>`` so the percentiles of accepted requests stay apart;
* anything else (other 5xx, timeouts, connection errors, malformed bodies):
  failure.

A POST /orders whose outcome is unknown (timeout, connection error, a 5xx
that may have come after the script ran) is retried with the same
Idempotency-Key, as a real client would, so what the client was told can be
compared with what was stored. Every acknowledged order (and what its owner
was last told about its status) goes to the ledger file (``--ledger``) when
Locust quits; ``python -m loadtests.verify`` checks it against the shop.

The load shape comes from ``PHONESHOP_SHAPE`` (``step`` or ``overflow``, see
loadtests/shapes.py); without it, ``--users``/``--run-time`` apply.
Thresholds (``--max-failure-ratio``, ``--max-p95-ms``, ``--max-p99-ms``, over
accepted requests) are checked when Locust quits: missing one makes it exit 1.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import secrets
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import gevent.pool
from locust import FastHttpUser, constant_throughput, events, task
from locust.env import Environment
from locust.stats import StatsEntry

from app.vocabulary import OPEN, ORDER_STATUSES
from loadtests import shapes

log = logging.getLogger("phoneshop.locust")

SHED_PREFIX = "[shed] "
BUSINESS_CODES = {
    402: {"insufficient_funds"},
    # order_<status>: a check or cancel of an order no longer open (app/problems.py).
    409: {"out_of_stock", "idempotency_key_in_use"}
    | {f"order_{status}" for status in ORDER_STATUSES if status != OPEN},
}
# Answers that prove a POST /orders was not placed: nginx's limiter and the
# app's in-flight cap refuse before any handler runs.
NOT_PLACED_CODES = {"rate_limited", "overloaded"}
RETRIES = 3


# ---- options ------------------------------------------------------------------------


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser  # Locust's own add_argument (groups lose env_var and is_secret)
    group.add_argument(
        "--admin-token",
        env_var="ADMIN_TOKEN",
        default="",
        is_secret=True,
        help="Admin bearer token, for provisioning (env ADMIN_TOKEN)",
    )
    group.add_argument(
        "--setup-host",
        env_var="PHONESHOP_SETUP_HOST",
        default="",
        help="Where provisioning goes (default: --host); e.g. one app instance directly",
    )
    group.add_argument("--customers", type=int, default=200, help="Customers to provision")
    group.add_argument(
        "--poor-share",
        type=float,
        default=0.2,
        help="Share of customers with only a few orders' worth of money",
    )
    group.add_argument("--phones", type=int, default=40, help="Phones to provision")
    group.add_argument(
        "--scarce-phones", type=int, default=4, help="Of those, phones with little stock"
    )
    group.add_argument("--scarce-stock", type=int, default=25, help="Stock of each scarce phone")
    group.add_argument(
        "--user-rate",
        type=float,
        default=2.0,
        help="Tasks per second each user aims at (constant_throughput)",
    )
    group.add_argument(
        "--ledger",
        env_var="PHONESHOP_LEDGER",
        default="loadtests/reports/ledger.json",
        help="Where the acknowledged orders are written when Locust quits",
    )
    group.add_argument("--max-failure-ratio", type=float, default=0.01)
    group.add_argument("--max-p95-ms", type=float, default=500.0)
    group.add_argument("--max-p99-ms", type=float, default=1000.0)
    shapes.add_options(group)


# ---- what the run provisioned and what clients were told ------------------------------


class Ledger:
    """Everything the verifier needs: provisioned rows and acknowledged orders."""

    def __init__(self) -> None:
        self.run_id = secrets.token_hex(4)
        self.customers: list[dict[str, Any]] = []
        self.phones: list[dict[str, Any]] = []
        self.scarce: list[str] = []
        # order id -> {"customer_id", "status", "total_cents"}; status is what
        # the owner was last told, or "unknown" after an unanswered check/cancel.
        self.orders: dict[str, dict[str, Any]] = {}
        # POST /orders whose outcome stayed unknown after every retry.
        self.unresolved_orders = 0
        self.outcomes: Counter[str] = Counter()
        self.started = self.ready = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "customers": self.customers,
            "phones": self.phones,
            "orders": self.orders,
            "unresolved_orders": self.unresolved_orders,
            "outcomes": dict(self.outcomes),
        }


LEDGER = Ledger()
_customer_slots = itertools.count()


def _admin_call(base: str, token: str, method: str, path: str, body: dict) -> dict:
    """One admin request; waits out 429/503 (Retry-After) up to 10 times."""
    data = json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    for _ in range(10):
        request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code not in (429, 503):
                raise RuntimeError(
                    f"{method} {path}: {error.code} {error.read()[:300]!r}"
                ) from None
            # Back off as Retry-After asks (capped), as a client does: pacing.
            time.sleep(min(2.0, float(error.headers.get("Retry-After") or 1)))
    raise RuntimeError(f"{method} {path}: still refused after 10 attempts")


def provision(environment: Environment) -> None:
    options = environment.parsed_options
    base = (options.setup_host or environment.host or "").rstrip("/")
    token = options.admin_token
    if not base or not token:
        raise RuntimeError("provisioning needs --host (or --setup-host) and --admin-token")
    rng = random.Random()
    pool = gevent.pool.Pool(16)

    def phone(i: int) -> dict:
        scarce = i < options.scarce_phones
        body = {
            "name": f"Load phone {LEDGER.run_id}-{i}",
            "description": "Provisioned by the load test",
            "image_url": f"/img/load-{i}.png",
            "price_cents": rng.randrange(5_000, 150_000),
            "stock": options.scarce_stock if scarce else 10_000_000,
        }
        created = _admin_call(base, token, "POST", "/phones", body)["phone"]
        return {"id": created["id"], "scarce": scarce, "price_cents": body["price_cents"]}

    def customer(i: int) -> dict:
        poor = i < options.customers * options.poor_share
        balance = 400_000 if poor else 10**11
        body = {
            "name": "Load",
            "surname": f"Customer {i}",
            "email": f"load-{LEDGER.run_id}-{i}@example.com",
            "balance_cents": balance,
        }
        created = _admin_call(base, token, "POST", "/customers", body)
        return {
            "id": created["customer"]["id"],
            "token": created["token"],
            "balance_cents": balance,
            "poor": poor,
        }

    LEDGER.phones = list(pool.imap(phone, range(options.phones)))
    LEDGER.scarce = [p["id"] for p in LEDGER.phones if p["scarce"]]
    customers = list(pool.imap(customer, range(options.customers)))
    random.shuffle(customers)  # poor and rich customers mixed among the users
    LEDGER.customers = customers


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    global _ENVIRONMENT
    _ENVIRONMENT = environment
    options = environment.parsed_options
    if options is not None:
        Shopper.wait_time = constant_throughput(options.user_rate)


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    LEDGER.started = time.monotonic()
    provision(environment)
    LEDGER.ready = time.monotonic()
    log.info(
        "provisioned %d phones and %d customers in %.1fs (run %s)",
        len(LEDGER.phones),
        len(LEDGER.customers),
        LEDGER.ready - LEDGER.started,
        LEDGER.run_id,
    )
    if environment.shape_class is not None:
        environment.shape_class.reset_time()  # the shape's clock starts after set-up


# ---- the user -------------------------------------------------------------------------


def _problem_code(response: Any) -> str | None:
    try:
        body = json.loads(response.content or b"")
    except (ValueError, TypeError):
        return None
    return body.get("code") if isinstance(body, dict) else None


def _json(response: Any) -> Any:
    try:
        return json.loads(response.content or b"")
    except (ValueError, TypeError):
        return None


def _valid_order(body: Any) -> bool:
    order = body.get("order") if isinstance(body, dict) else None
    return (
        isinstance(order, dict)
        and isinstance(order.get("id"), str)
        and order.get("status") in ORDER_STATUSES
        and isinstance(order.get("total_cents"), int)
        and isinstance(order.get("items"), list)
    )


def _valid_page(body: Any, plural: str) -> bool:
    return (
        isinstance(body, dict)
        and isinstance(body.get(plural), list)
        and all(isinstance(body.get(k), int) for k in ("page", "per_page", "total", "pageCount"))
    )


def _valid_phone(body: Any) -> bool:
    phone = body.get("phone") if isinstance(body, dict) else None
    return isinstance(phone, dict) and isinstance(phone.get("stock"), int)


def classify(response: Any, ok: int, valid: Any, business: bool = False) -> str:
    """Mark ``response`` (a catch_response context) and say what it was:
    accepted, business, shed, not_placed or failed."""
    status = response.status_code
    if status == ok:
        body = _json(response)
        if valid(body):
            response.success()
            LEDGER.outcomes["accepted"] += 1
            return "accepted"
        response.failure(f"malformed {status} body: {(response.content or b'')[:200]!r}")
        LEDGER.outcomes["malformed"] += 1
        return "failed"
    if business and status in BUSINESS_CODES:
        code = _problem_code(response)
        if code in BUSINESS_CODES[status]:
            response.success()
            LEDGER.outcomes[f"business_{status}"] += 1
            return "business"
        response.failure(f"{status} with unexpected code {code!r}")
        LEDGER.outcomes["failed"] += 1
        return "failed"
    if status in (429, 503) and response.headers.get("Retry-After"):
        response.request_meta["name"] = SHED_PREFIX + response.request_meta["name"]
        response.success()
        LEDGER.outcomes[f"shed_{status}"] += 1
        return "not_placed" if _problem_code(response) in NOT_PLACED_CODES else "shed"
    if status == 0:
        response.failure(f"no answer: {response.error!r}")
        LEDGER.outcomes["no_answer"] += 1
    else:
        response.failure(f"unexpected status {status}: {(response.content or b'')[:200]!r}")
        LEDGER.outcomes[f"unexpected_{status}"] += 1
    return "failed"


class Shopper(FastHttpUser):
    """One customer session; each user is a provisioned customer (round robin)."""

    # Fail fast rather than hide overload in client-side queues.
    network_timeout = 10.0
    connection_timeout = 5.0
    wait_time = constant_throughput(2.0)  # replaced by --user-rate at init

    def on_start(self) -> None:
        if not LEDGER.customers:
            raise RuntimeError("no customers provisioned")
        me = LEDGER.customers[next(_customer_slots) % len(LEDGER.customers)]
        self.customer_id = me["id"]
        self.auth = {"Authorization": f"Bearer {me['token']}"}
        self.my_orders: list[str] = []
        self.pages = max(1, -(-len(LEDGER.phones) // 10))

    # ---- browsing (the heaviest part) ----

    @task(6)
    def browse(self) -> None:
        page = random.randint(1, self.pages + 1)  # one page past the end now and then
        with self.client.get(
            f"/phones?page={page}",
            headers=self.auth,
            name="/phones?page=[n]",
            catch_response=True,
        ) as response:
            classify(response, 200, lambda body: _valid_page(body, "phones"))

    @task(3)
    def view_phone(self) -> None:
        phone = random.choice(LEDGER.phones)["id"]
        with self.client.get(
            f"/phones/{phone}", headers=self.auth, name="/phones/[id]", catch_response=True
        ) as response:
            classify(response, 200, _valid_phone)

    @task(1)
    def list_my_orders(self) -> None:
        with self.client.get(
            "/orders?page=1", headers=self.auth, name="/orders?page=[n]", catch_response=True
        ) as response:
            classify(response, 200, lambda body: _valid_page(body, "orders"))

    @task(1)
    def view_my_order(self) -> None:
        if not self.my_orders:
            return
        order_id = random.choice(self.my_orders)
        with self.client.get(
            f"/orders/{order_id}", headers=self.auth, name="/orders/[id]", catch_response=True
        ) as response:
            classify(response, 200, _valid_order)

    # ---- buying ----

    def _lines(self) -> list[dict[str, Any]]:
        if LEDGER.scarce and random.random() < 0.15:
            chosen = [random.choice(LEDGER.scarce)]
        else:
            chosen = random.sample(LEDGER.phones, k=random.choice((1, 1, 1, 2)))
            chosen = [p["id"] for p in chosen]
        return [{"phone_id": p, "quantity": random.randint(1, 3)} for p in chosen]

    def place(self, autocheck: bool) -> dict[str, Any] | None:
        """POST /orders; on an unknown outcome, retry with the same Idempotency-Key."""
        body = {"items": self._lines(), "autocheck": autocheck}
        headers = {**self.auth, "Idempotency-Key": f"load-{secrets.token_hex(12)}"}
        # Counted as unresolved until an answer settles it: a user stopped by
        # Locust mid-request (end of a run) may leave an order the client never saw.
        LEDGER.unresolved_orders += 1
        for attempt in range(RETRIES + 1):
            with self.client.post(
                "/orders", json=body, headers=headers, name="/orders", catch_response=True
            ) as response:
                outcome = classify(response, 201, _valid_order, business=True)
                code = _problem_code(response) if outcome == "business" else None
            if outcome == "accepted":
                order = _json(response)["order"]
                LEDGER.orders[order["id"]] = {
                    "customer_id": self.customer_id,
                    "status": order["status"],
                    "total_cents": order["total_cents"],
                }
                self.my_orders.append(order["id"])
                LEDGER.unresolved_orders -= 1
                return order
            if outcome in ("business", "not_placed") and code != "idempotency_key_in_use":
                LEDGER.unresolved_orders -= 1
                return None  # a definite answer: not placed
            if attempt < RETRIES:
                retry_after = response.headers.get("Retry-After") if response.headers else None
                wait = float(retry_after) if retry_after and retry_after.isdigit() else 0.2
                time.sleep(min(wait, 1.0) * random.uniform(0.5, 1.0))  # back-off: pacing
        return None  # still unresolved

    @task(3)
    def buy(self) -> None:
        self.place(autocheck=True)

    @task(1)
    def buy_then_decide(self) -> None:
        order = self.place(autocheck=False)
        if order is None:
            return
        action = "check" if random.random() < 0.67 else "cancel"
        entry = LEDGER.orders[order["id"]]
        # Unknown until the answer arrives (the user may be stopped mid-request).
        entry["status"] = "unknown"
        with self.client.post(
            f"/orders/{order['id']}/{action}",
            headers=self.auth,
            name=f"/orders/[id]/{action}",
            catch_response=True,
        ) as response:
            outcome = classify(response, 200, _valid_order, business=True)
        if outcome == "accepted":
            entry["status"] = _json(response)["order"]["status"]
        elif outcome in ("business", "not_placed"):
            entry["status"] = order["status"]  # refused: still what placing said
        # failed or shed: it may or may not have happened; stays unknown


# ---- per-phase and per-second figures (for the overflow report) -------------------------


class Timeline:
    """Latencies of accepted requests and shed/failed counts, per shape phase and per second."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.phases: dict[str, dict[str, Any]] = {}
        self.seconds: dict[int, dict[str, Any]] = {}

    @staticmethod
    def _bucket() -> dict[str, Any]:
        return {"accepted": [], "shed": 0, "failed": 0, "first": None, "last": None}

    def record(self, phase: str, name: str, ms: float, failed: bool) -> None:
        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now
        second = int(now - self.t0)
        for bucket in (
            self.phases.setdefault(phase, self._bucket()),
            self.seconds.setdefault(second, {**self._bucket(), "phase": phase}),
        ):
            if failed:
                bucket["failed"] += 1
            elif name.startswith(SHED_PREFIX):
                bucket["shed"] += 1
            else:
                bucket["accepted"].append(ms)
            bucket["first"] = now - self.t0 if bucket["first"] is None else bucket["first"]
            bucket["last"] = now - self.t0

    @staticmethod
    def _figures(bucket: dict[str, Any]) -> dict[str, Any]:
        times = sorted(bucket["accepted"])
        total = len(times) + bucket["shed"] + bucket["failed"]

        def pct(q: float) -> float:
            return round(times[min(len(times) - 1, int(q * len(times)))], 2) if times else 0.0

        span = (bucket["last"] or 0) - (bucket["first"] or 0)
        return {
            "requests": total,
            "accepted": len(times),
            "shed": bucket["shed"],
            "failed": bucket["failed"],
            "shed_share": bucket["shed"] / total if total else 0.0,
            "p50_ms": pct(0.5),
            "p95_ms": pct(0.95),
            "p99_ms": pct(0.99),
            "seconds": round(span, 2),
            "rps": total / span if span > 0 else 0.0,
            "accepted_rps": len(times) / span if span > 0 else 0.0,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "phases": {name: self._figures(b) for name, b in self.phases.items()},
            "seconds": [
                {"second": s, "phase": b["phase"], **self._figures(b)}
                for s, b in sorted(self.seconds.items())
            ],
        }


TIMELINE = Timeline()


@events.request.add_listener
def _on_request(
    request_type: str, name: str, response_time: float, exception: Any, context: Any, **_: Any
) -> None:
    shape = _ENVIRONMENT.shape_class if _ENVIRONMENT is not None else None
    phase = getattr(shape, "current_phase", "run") if shape is not None else "run"
    TIMELINE.record(phase, name, response_time, exception is not None)


_ENVIRONMENT: Environment | None = None


# ---- thresholds and the ledger, when Locust quits --------------------------------------


def accepted_entry(environment: Environment) -> StatsEntry:
    """All requests except the shed ones, merged: the percentiles thresholds use."""
    merged = StatsEntry(environment.stats, "accepted", "", use_response_times_cache=False)
    for (name, _method), entry in environment.stats.entries.items():
        if not name.startswith(SHED_PREFIX):
            merged.extend(entry)
    return merged


def summary(environment: Environment) -> dict[str, Any]:
    options = environment.parsed_options
    total = environment.stats.total
    accepted = accepted_entry(environment)
    shed = sum(
        e.num_requests
        for (n, _), e in environment.stats.entries.items()
        if n.startswith(SHED_PREFIX)
    )
    failure_ratio = total.num_failures / total.num_requests if total.num_requests else 0.0
    p95 = accepted.get_response_time_percentile(0.95) if accepted.num_requests else 0
    p99 = accepted.get_response_time_percentile(0.99) if accepted.num_requests else 0
    missed = []
    if total.num_requests == 0:
        missed.append("no request was made")
    if failure_ratio > options.max_failure_ratio:
        missed.append(f"failure ratio {failure_ratio:.4f} > {options.max_failure_ratio}")
    if p95 > options.max_p95_ms:
        missed.append(f"p95 of accepted requests {p95} ms > {options.max_p95_ms} ms")
    if p99 > options.max_p99_ms:
        missed.append(f"p99 of accepted requests {p99} ms > {options.max_p99_ms} ms")
    return {
        "requests": total.num_requests,
        "failures": total.num_failures,
        "failure_ratio": failure_ratio,
        "shed": shed,
        "accepted_p50_ms": accepted.get_response_time_percentile(0.5)
        if accepted.num_requests
        else 0,
        "accepted_p95_ms": p95,
        "accepted_p99_ms": p99,
        "rps": total.total_rps,
        "thresholds": {
            "max_failure_ratio": options.max_failure_ratio,
            "max_p95_ms": options.max_p95_ms,
            "max_p99_ms": options.max_p99_ms,
        },
        "missed": missed,
    }


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:
        return
    result = summary(environment)
    plan = environment.shape_class.plan() if environment.shape_class is not None else []
    data = {
        **LEDGER.to_json(),
        "host": environment.host,
        "summary": result,
        "plan": plan,
        "timeline": TIMELINE.to_json(),
    }
    path = Path(options.ledger)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    log.info(
        "ledger: %d acknowledged orders, %d unresolved -> %s",
        len(LEDGER.orders),
        LEDGER.unresolved_orders,
        path,
    )
    if result["missed"]:
        for reason in result["missed"]:
            log.error("threshold missed: %s", reason)
        environment.process_exit_code = 1
    else:
        log.info(
            "thresholds met: failure ratio %.4f, accepted p95 %s ms, p99 %s ms",
            result["failure_ratio"],
            result["accepted_p95_ms"],
            result["accepted_p99_ms"],
        )


# The load shape, when one is asked for (a module-level LoadTestShape class is
# what Locust looks for; only the chosen one is bound here).
_shape_name = os.environ.get("PHONESHOP_SHAPE", "").strip()
if _shape_name:
    LoadShape = shapes.pick(_shape_name)
