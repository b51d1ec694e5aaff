"""Issue 8: metrics, JSON logs with one request id, `make status`.

Real processes only (loadtests/support/, tests/mail_fixtures.py): a stack of nginx,
one gunicorn instance with 2 workers and redis, the mail worker
(``python -m mail``) and the dev SMTP sink. Metrics are asserted as exact
differences of counters around known traffic, never as timings.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from app import appkeys, keys, metrics
from app.ids import new_id
from app.logs import JsonFormatter, request_id_var
from app.main import create_app
from app.ops.instances import mail_argv
from app.ops.poll import wait_until_async
from app.ops.status import stack_env
from app.partitions import PARTITIONS, partition_of
from app.settings import Settings
from loadtests.support.mail_sink import MailSink, running_sink
from loadtests.support.servers import clean_env, free_port, stop_process, wait_for_port
from loadtests.support.stack import FullStack, start_full_stack
from tests.helpers import ADMIN, Shop
from tests.mail_fixtures import (
    ROOT,
    SmtpServer,
    event_fields,
    seed_order,
    settings_env,
)

TIMEOUT = aiohttp.ClientTimeout(total=60)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ---- helpers ----------------------------------------------------------------------


def parse_metrics(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def scrape(http: aiohttp.ClientSession, url: str, **headers: str) -> Samples:
    async with http.get(f"{url}/metrics", headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "text/plain"
        return parse_metrics(await response.text())


def json_lines(path: Path, strict: bool = False) -> list[dict[str, Any]]:
    """The log's JSON lines; ``strict`` fails on any other line."""
    if not path.exists():
        return []
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            if strict:
                raise
    return lines


def mail_worker_env(redis_url: str, smtp_port: int, metrics_port: int, name: str) -> dict:
    return clean_env(
        REDIS_URL=redis_url,
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(smtp_port),
        MAIL_WORKER_NAME=name,
        MAIL_METRICS_PORT=str(metrics_port),
        MAIL_HEARTBEAT_SECONDS="1",
        PYTHONPATH=str(ROOT),
    )


def start_mail_worker(log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """``python -m mail`` logging into ``log_path``, once its metrics port listens."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            mail_argv(),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wait_for_port(int(env["MAIL_METRICS_PORT"]), timeout=30, proc=proc)
    return proc


@dataclass
class Ops:
    stack: FullStack
    sink: MailSink
    mail: subprocess.Popen
    mail_log: Path
    mail_metrics_url: str

    @property
    def instance_url(self) -> str:
        return self.stack.instances[0].url

    def log_files(self) -> list[Path]:
        """Every log a process of this stack wrote."""
        return [
            self.stack.nginx.access_log,
            self.stack.nginx.error_log,
            *(instance.log_path for instance in self.stack.instances),
            self.mail_log,
            self.stack.redis.directory / "redis.log",
        ]


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    """nginx + 1 instance x 2 workers (access log on stdout) + redis, the mail
    worker with its metrics port, and the dev SMTP sink."""
    directory = tmp_path_factory.mktemp("ops")
    with (
        start_full_stack(
            directory / "stack",
            instances=1,
            workers=2,
            # Exact counts after bursts: no request may be refused for having
            # queued behind other processes of a busy box (tests/test_overload.py).
            env={"WEB_ACCESS_LOG": "-", "OVERLOAD_ADAPTIVE": "0"},
        ) as stack,
        running_sink(directory) as sink,
    ):
        mail_log = directory / "mail-worker.log"
        metrics_port = free_port()
        mail = start_mail_worker(
            mail_log, mail_worker_env(stack.redis.url, sink.port, metrics_port, "ops-mail")
        )
        try:
            yield Ops(stack, sink, mail, mail_log, f"http://127.0.0.1:{metrics_port}")
        finally:
            stop_process(mail)


async def new_phone(http: aiohttp.ClientSession, ops: Ops, stock: int) -> str:
    response = await http.post(
        f"{ops.instance_url}/phones",
        json={"name": "Ops phone", "price_cents": 1000, "stock": stock},
        headers=ops.stack.admin_headers,
    )
    assert response.status == 201, await response.text()
    return (await response.json())["phone"]["id"]


async def new_customer(
    http: aiohttp.ClientSession, ops: Ops, balance_cents: int = 1_000_000
) -> tuple[str, str]:
    """(customer id, bearer token)."""
    response = await http.post(
        f"{ops.instance_url}/customers",
        json={
            "name": "Ada",
            "surname": "Ops",
            "email": f"ops-{uuid.uuid4().hex}@example.com",
            "balance_cents": balance_cents,
        },
        headers=ops.stack.admin_headers,
    )
    assert response.status == 201, await response.text()
    body = await response.json()
    return body["customer"]["id"], body["token"]


# ---- metrics through the real stack -----------------------------------------------


async def test_metrics_move_exactly_with_known_traffic_summed_over_both_workers(
    ops: Ops,
) -> None:
    """Known traffic through nginx moves every counter by exactly its share, and
    the instance's /metrics is the sum over both of its workers."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        phone = await new_phone(http, ops, stock=10)
        _, token = await new_customer(http, ops)
        _, broke_token = await new_customer(http, ops, balance_cents=0)
        auth = {"Authorization": f"Bearer {token}"}
        api = ops.stack.http_url
        before = await scrape(http, ops.instance_url)

        def order(quantity: int = 1, **extra: Any) -> dict[str, Any]:
            return {"items": [{"phone_id": phone, "quantity": quantity}], **extra}

        async def post(path: str, body: Any, status: int, headers: dict[str, str]) -> dict:
            async with http.post(f"{api}{path}", json=body, headers=headers) as response:
                assert response.status == status, await response.text()
                return await response.json(content_type=None)

        keyed = {**auth, "Idempotency-Key": f"ops-{uuid.uuid4().hex}"}
        await post("/orders", order(), 201, keyed)  # placed + completed (autocheck)
        checked = (await post("/orders", order(autocheck=False), 201, auth))["order"]["id"]
        cancelled = (await post("/orders", order(autocheck=False), 201, auth))["order"]["id"]
        await post(f"/orders/{checked}/check", None, 200, auth)  # completed
        await post(f"/orders/{cancelled}/cancel", None, 200, auth)  # cancelled
        await post(f"/orders/{cancelled}/cancel", None, 200, auth)  # again: unchanged
        await post("/orders", order(), 201, keyed)  # the same key and body: a replay
        await post("/orders", order(quantity=100), 409, auth)  # out_of_stock
        await post("/orders", order(), 402, {"Authorization": f"Bearer {broke_token}"})
        missing = {"items": [{"phone_id": new_id(), "quantity": 1}]}
        await post("/orders", missing, 404, auth)  # phone_not_found

        # Reads from many connections at once until both workers served some:
        # their access lines name the pid that answered.
        reads, prefix = 0, f"ops-burst-{uuid.uuid4().hex}"
        for _ in range(20):
            async with aiohttp.ClientSession(
                timeout=TIMEOUT, connector=aiohttp.TCPConnector(force_close=True)
            ) as burst:

                async def read(n: int, burst: aiohttp.ClientSession = burst) -> None:
                    headers = {"X-Request-ID": f"{prefix}-{n}"}
                    async with burst.get(f"{api}/phones/{phone}", headers=headers) as response:
                        assert response.status == 200

                await asyncio.gather(*(read(reads + n) for n in range(30)))
                reads += 30
            lines = json_lines(ops.stack.instances[0].log_path)
            pids = {
                line["pid"]
                for line in lines
                if line.get("request_id", "").startswith(prefix)
                and line["logger"] == "phoneshop.access"
            }
            if len(pids) == 2:
                break
        assert len(pids) == 2, "both workers of the instance served reads"

        after = await scrape(http, ops.instance_url)

    assert delta(before, after, "phoneshop_orders_placed_total") == 3
    assert delta(before, after, "phoneshop_orders_completed_total") == 2
    assert delta(before, after, "phoneshop_orders_cancelled_total") == 1
    assert delta(before, after, "phoneshop_idempotent_replays_total") == 1
    rejected = "phoneshop_orders_rejected_total"
    assert delta(before, after, rejected, reason="out_of_stock") == 1
    assert delta(before, after, rejected, reason="insufficient_funds") == 1
    assert delta(before, after, rejected, reason="phone_not_found") == 1

    requests = "phoneshop_http_requests_total"
    assert delta(before, after, requests, method="POST", route="/orders", status="201") == 4
    assert delta(before, after, requests, method="POST", route="/orders", status="409") == 1
    assert delta(before, after, requests, method="POST", route="/orders", status="402") == 1
    assert delta(before, after, requests, method="POST", route="/orders", status="404") == 1
    check_route, cancel_route = "/orders/{id}/check", "/orders/{id}/cancel"
    assert delta(before, after, requests, method="POST", route=check_route, status="200") == 1
    assert delta(before, after, requests, method="POST", route=cancel_route, status="200") == 2
    phone_route = {"method": "GET", "route": "/phones/{id}", "status": "200"}
    assert delta(before, after, requests, **phone_route) == reads
    duration = "phoneshop_http_request_duration_seconds"
    assert delta(before, after, f"{duration}_count", **phone_route) == reads
    assert delta(before, after, f"{duration}_bucket", le="+Inf", **phone_route) == reads
    redis_calls = "phoneshop_redis_call_duration_seconds_count"
    if Settings.from_env(ops.stack.env).saga_always_split:
        # The saga: each of the seven POST /orders reserved (the replay too, under a
        # new order id) and was answered by one script, a commit (3 placed, the replay,
        # the 402) or a rejection (a reserve refused: the 409 and the 404), each timed
        # once; the cancels are refunds (settles and give-backs are batched: not counted).
        assert delta(before, after, redis_calls, call="script:reserve_stock") == 7
        assert delta(before, after, redis_calls, call="script:commit_order") == 5
        assert delta(before, after, redis_calls, call="script:reject_order") == 2
        assert delta(before, after, redis_calls, call="script:refund_order") == 2
        assert delta(before, after, redis_calls, call="script:place_order") == 0
    else:
        # Seven place_order scripts ran (the replay too), each timed once.
        assert delta(before, after, redis_calls, call="script:place_order") == 7
        assert delta(before, after, redis_calls, call="script:cancel_order") == 2
    assert delta(before, after, redis_calls, call="script:check_order") == 1
    # Nothing in flight at rest (/metrics itself is not counted), summed over live workers.
    assert value(after, "phoneshop_http_requests_in_flight") == 0
    # Never a raw path or id as a label.
    assert not any(phone in str(labels) for _, labels in after)


async def test_metrics_through_nginx_from_this_box(ops: Ops) -> None:
    """nginx forwards the loopback client it saw: /metrics answers without a token."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        samples = await scrape(http, ops.stack.http_url)
        # X-Forwarded-For from the client is overwritten by nginx: still this box.
        spoofed = await scrape(http, ops.stack.http_url, **{"X-Forwarded-For": "203.0.113.9"})
    assert any(name == "phoneshop_http_requests_total" for name, _ in samples)
    assert any(name == "phoneshop_http_requests_total" for name, _ in spoofed)


async def test_labelled_counters_exist_at_zero_from_the_start(tmp_path: Path) -> None:
    """Issue 18 item 4: a fresh instance already exposes every known reason of
    the labelled counters at 0, so rate() and alerts see the series before the
    first increment; the first rejection then moves exactly its own series."""
    with start_full_stack(tmp_path, instances=1, workers=2) as stack:
        instance = stack.instances[0].url
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            fresh = await scrape(http, instance)
            expected = [("phoneshop_http_shed_total", r) for r in metrics.SHED_REASONS] + [
                ("phoneshop_orders_rejected_total", r) for r in metrics.ORDER_REJECT_REASONS
            ]
            for name, reason in expected:
                key = (name, frozenset({("reason", reason)}))
                assert fresh.get(key) == 0.0, (name, reason)

            response = await http.post(
                f"{instance}/customers",
                json={"name": "A", "surname": "B", "email": "z@example.com", "balance_cents": 1},
                headers=stack.admin_headers,
            )
            token = (await response.json())["token"]
            refused = await http.post(
                f"{instance}/orders",
                json={"items": [{"phone_id": new_id(), "quantity": 1}]},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert refused.status == 404
            after = await scrape(http, instance)
    rejected = "phoneshop_orders_rejected_total"
    assert delta(fresh, after, rejected, reason="phone_not_found") == 1
    for name, reason in expected:
        if reason != "phone_not_found":
            assert (name, frozenset({("reason", reason)})) in after
            assert delta(fresh, after, name, reason=reason) == 0


def test_the_rejection_reasons_are_the_place_order_scripts_codes() -> None:
    """The list the counter is initialised from is the script's documented answers, less
    order_chunk_stale: not a refusal of the order but a stale chunk hint, which
    app/orders/service.py's place_order retries with a new id."""
    header = (ROOT / "app" / "lua" / "place_order.lua").read_text().split("\nlocal ", 1)[0]
    codes = set(re.findall(r'code="([a-z_]+)"', header))
    assert "order_chunk_stale" in codes
    assert codes - {"order_chunk_stale"} == set(metrics.ORDER_REJECT_REASONS)


# ---- logs: one request id from nginx to the mail worker, no tokens --------------------


async def test_one_request_id_in_nginx_app_and_mail_worker_logs(ops: Ops) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        phone = await new_phone(http, ops, stock=5)
        _, token = await new_customer(http, ops)
        async with http.post(
            f"{ops.stack.http_url}/orders",
            json={"items": [{"phone_id": phone, "quantity": 1}]},
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            assert response.status == 201, await response.text()
            order_id = (await response.json())["order"]["id"]
            request_id = response.headers["X-Request-ID"]  # made by nginx

    def mail_lines() -> list[dict[str, Any]]:
        return [line for line in json_lines(ops.mail_log) if line.get("request_id") == request_id]

    await wait_until_async(lambda: bool(mail_lines()), what="the mail worker's line")
    [sent] = mail_lines()
    assert sent["logger"] == "mail.worker" and sent["level"] == "INFO"
    assert f"order {order_id}: confirmation sent" in sent["message"]

    [nginx] = [
        line for line in json_lines(ops.stack.nginx.access_log) if line["request_id"] == request_id
    ]
    assert (nginx["method"], nginx["uri"], nginx["status"]) == ("POST", "/orders", 201)

    app_lines = [
        line
        for line in json_lines(ops.stack.instances[0].log_path)
        if line.get("request_id") == request_id
    ]
    [access] = [line for line in app_lines if line["logger"] == "phoneshop.access"]
    assert access["route"] == "/orders" and access["status"] == 201
    assert access["remote"] == "127.0.0.1"  # nginx's X-Forwarded-For

    # "One grep": the id appears in every process's log of this order.
    files = [ops.stack.nginx.access_log, ops.stack.instances[0].log_path, ops.mail_log]
    assert all(request_id in path.read_text() for path in files)


async def test_no_token_in_any_log_line(ops: Ops) -> None:
    """Admin and customer tokens go through every path that logs (success,
    401, 403, 404, problem answers, the mail worker), then no log of any process
    of the stack holds either token."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        phone = await new_phone(http, ops, stock=5)
        customer_id, token = await new_customer(http, ops)
        customer = {"Authorization": f"Bearer {token}"}
        api = ops.stack.http_url
        calls = [
            ("POST", "/orders", customer, {"items": [{"phone_id": phone, "quantity": 1}]}),
            ("GET", f"/customers/{customer_id}", customer, None),
            ("GET", "/admin/audit", customer, None),  # 403
            ("GET", "/admin/audit", ops.stack.admin_headers, None),
            ("GET", "/metrics", ops.stack.admin_headers, None),
            ("GET", "/orders", {"Authorization": f"Bearer {token}x"}, None),  # 401
            ("GET", f"/orders/{new_id()}", customer, None),  # 404
            ("POST", "/orders", customer, {"items": "not a list"}),  # 422
        ]
        for method, path, headers, body in calls:
            async with http.request(method, f"{api}{path}", headers=headers, json=body) as r:
                assert r.status < 500
        # And a WebSocket offering the token as its subprotocol, as browsers do.
        async with http.ws_connect(f"{api}/orders/events", protocols=("bearer", token)) as socket:
            await socket.close()
        # Let the mail worker log its mail.
        redis = Redis.from_url(ops.stack.redis.url)
        try:
            await wait_until_async(lambda: _mailer_idle(redis), what="the mailer group idle")
        finally:
            await redis.aclose()

    secrets = {"admin token": ops.stack.admin_token, "customer token": token}
    for path in ops.log_files():
        assert path.exists(), path
        text = path.read_text(errors="replace")
        for what, secret in secrets.items():
            assert secret not in text, f"the {what} is in {path}"
    assert customer_id in ops.stack.nginx.access_log.read_text()  # we did read the right files


async def _mailer_idle(redis: Redis) -> bool:
    """Every partition's mailer group was given every entry and has none pending."""
    async with redis.pipeline(transaction=False) as pipe:
        for partition in range(PARTITIONS):
            pipe.xinfo_stream(keys.events(partition))
            pipe.xinfo_groups(keys.events(partition))
        replies = await pipe.execute(raise_on_error=False)
    for stream, groups in zip(replies[0::2], replies[1::2], strict=True):
        if isinstance(stream, Exception):
            return False
        mailer = [g for g in groups if g["name"] == keys.MAIL_GROUP.encode()]
        if not mailer or mailer[0]["pending"] != 0:
            return False
        if mailer[0]["last-delivered-id"] != stream["last-generated-id"]:
            return False
    return True


def test_every_app_and_mail_worker_line_is_json(ops: Ops) -> None:
    for path in (ops.stack.instances[0].log_path, ops.mail_log):
        lines = json_lines(path, strict=True)
        assert lines
        for line in lines:
            assert {"time", "level", "logger", "pid", "message"} <= set(line), line


def test_json_formatter_carries_the_request_id_and_scrubs_bearer_tokens() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord(
        "app.test", logging.WARNING, __file__, 1, "got %s", ("Bearer abc.DEF-123",), None
    )
    token = request_id_var.set("rid-42")
    try:
        line = json.loads(formatter.format(record))
    finally:
        request_id_var.reset(token)
    assert line["request_id"] == "rid-42"
    assert line["message"] == "got Bearer [redacted]"
    assert "abc.DEF-123" not in json.dumps(line)


# ---- /metrics in-process: who may read it, labels, shed counts ---------------------


async def test_metrics_are_for_loopback_or_the_admin(shop: Shop) -> None:
    client = shop.client
    response = await client.get("/metrics")  # the test client is on 127.0.0.1
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    assert "phoneshop_http_requests_total" in await response.text()

    remote = {"X-Forwarded-For": "203.0.113.7"}  # nginx says: a client elsewhere
    assert (await client.get("/metrics", headers=remote)).status == 401
    _, customer = await shop.customer()
    assert (await client.get("/metrics", headers={**remote, **customer})).status == 403
    assert (await client.get("/metrics", headers={**remote, **ADMIN})).status == 200


async def test_without_behind_proxy_x_forwarded_for_is_ignored(
    aiohttp_client: Any, app_env: dict[str, str], redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BEHIND_PROXY", "0")
    client = await aiohttp_client(await create_app())
    # The peer (loopback) decides, whatever the header claims.
    assert (await client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.7"})).status == 200


async def test_route_labels_are_templates_never_raw_paths(shop: Shop) -> None:
    client = shop.client
    unknown_phone, odd_path = new_id(), f"/no/such/{uuid.uuid4().hex}"
    before = parse_metrics(await (await client.get("/metrics")).text())
    assert (await client.get(f"/phones/{unknown_phone}")).status == 404
    assert (await client.get(odd_path)).status == 404
    text = await (await client.get("/metrics")).text()
    after = parse_metrics(text)
    requests = "phoneshop_http_requests_total"
    labels = {"method": "GET", "status": "404"}
    assert delta(before, after, requests, route="/phones/{id}", **labels) == 1
    assert delta(before, after, requests, route="unmatched", **labels) == 1
    assert unknown_phone not in text and odd_path not in text


async def test_the_apps_own_503s_are_counted_by_reason(
    aiohttp_client: Any, app_env: dict[str, str], redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAX_INFLIGHT", "1")
    client: TestClient = await aiohttp_client(await create_app())
    before = parse_metrics(await (await client.get("/metrics")).text())

    async def slow_request() -> aiohttp.ClientResponse:
        return await client.get("/bench/sleep", params={"ms": "2000"})

    slow = asyncio.create_task(slow_request())
    await wait_until_async(lambda: client.app[appkeys.INFLIGHT].current == 1, what="one in flight")
    in_flight = parse_metrics(await (await client.get("/metrics")).text())
    shed = await client.get("/bench/hello")
    assert shed.status == 503 and (await shed.json())["code"] == "overloaded"
    assert (await slow).status == 200

    # Redis unreachable: 503 service_unavailable.
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("MAX_INFLIGHT", "256")
    outage = await aiohttp_client(await create_app())
    response = await outage.get(f"/phones/{new_id()}")
    assert response.status == 503 and (await response.json())["code"] == "service_unavailable"

    after = parse_metrics(await (await client.get("/metrics")).text())
    assert delta(before, in_flight, "phoneshop_http_requests_in_flight") == 1
    assert delta(before, after, "phoneshop_http_requests_in_flight") == 0
    assert delta(before, after, "phoneshop_http_shed_total", reason="overloaded") == 1
    assert delta(before, after, "phoneshop_http_shed_total", reason="service_unavailable") == 1


# ---- the mail worker's metrics ----------------------------------------------------------


async def test_mail_worker_metrics_count_sent_retried_and_dead_letters(
    mail_settings: Any, mail_redis: Redis, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    retried = await seed_order(mail_redis)
    dead = await seed_order(mail_redis)
    smtp_server.answer_for(retried.email, "451 4.3.0 try again later")
    smtp_server.answer_for(dead.email, "550 5.1.1 no such user")
    for order, request_id in ((retried, "rid-retried"), (dead, "rid-dead")):
        fields = {**event_fields("order.completed", order), "request_id": request_id}
        await mail_redis.xadd(keys.events(partition_of(order.order_id)), fields)

    port = free_port()
    log_path = tmp_path / "worker.log"
    proc = start_mail_worker(log_path, settings_env(mail_settings, MAIL_METRICS_PORT=str(port)))
    try:
        url = f"http://127.0.0.1:{port}"

        async def current() -> Samples:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
                return await scrape(http, url)

        async def settled() -> bool:
            samples = await current()
            return (
                value(samples, "phoneshop_mail_sent_total") == 1
                and value(samples, "phoneshop_mail_dead_lettered_total") == 1
                and value(samples, "phoneshop_mail_dead_letters") == 1
                and value(samples, "phoneshop_mail_pending_entries") == 0
                and value(samples, "phoneshop_mail_retry_queue") == 0
            )

        await wait_until_async(settled, what="one mail sent after a retry, one dead-lettered")
        samples = await current()
    finally:
        stop_process(proc)

    assert value(samples, "phoneshop_mail_retried_total") == 1
    assert value(samples, "phoneshop_mail_lag_entries") == 0
    sends = "phoneshop_mail_send_duration_seconds_count"
    assert value(samples, sends, outcome="accepted") == 1
    assert value(samples, sends, outcome="failed") == 2  # the 451 and the 550
    # Each line about a mail carries the id of the request behind its event.
    lines = json_lines(log_path)
    sent = [line for line in lines if "confirmation sent" in line["message"]]
    assert [line["request_id"] for line in sent] == ["rid-retried"]
    dead_lines = [line for line in lines if "dead-lettered" in line["message"]]
    assert [line["request_id"] for line in dead_lines] == ["rid-dead"]


# ---- make status ---------------------------------------------------------------------------


def run_status(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", "app.ops.status", "--json", "--env-file", os.devnull],
        cwd=ROOT,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, json.loads(result.stdout)


def states(report: dict[str, Any]) -> dict[str, str]:
    return {check["name"]: check["state"] for check in report["checks"]}


def test_status_reports_every_process_then_a_killed_one(tmp_path: Path) -> None:
    metrics_port = free_port()
    with (
        start_full_stack(tmp_path / "stack", instances=1, workers=1) as stack,
        running_sink(tmp_path) as sink,
    ):
        mail = start_mail_worker(
            tmp_path / "mail.log",
            mail_worker_env(stack.redis.url, sink.port, metrics_port, "status-mail"),
        )
        try:
            instance = stack.instances[0]
            env = {
                "REDIS_URL": stack.redis.url,
                "APP_BASE_PORT": str(instance.port),
                "WEB_INSTANCES": "1",
                "HTTP_PORT": str(stack.nginx.config.http_port),
                "SEED_PHONES_PORT": str(stack.nginx.config.seed_phones_port),
                "SEED_ORDERS_PORT": str(stack.nginx.config.seed_orders_port),
                "SMTP_HOST": "127.0.0.1",
                "SMTP_PORT": str(sink.port),
                "MAIL_METRICS_PORT": str(metrics_port),
            }
            app_line, nginx_line = f"app :{instance.port}", f"nginx :{stack.nginx.config.http_port}"

            # The worker refreshes its health key once it runs its loop.
            redis_cli = stack.redis.cli
            asyncio.run(
                wait_until_async(
                    lambda: redis_cli("EXISTS", keys.mail_worker_alive("status-mail")) == "1",
                    what="the mail worker alive",
                )
            )
            code, report = run_status(env)
            assert code == 0, report
            assert report["ok"] is True
            assert set(states(report).values()) == {"OK"}, report
            assert {"redis", app_line, nginx_line, "mail worker", "mail backlog"} <= set(
                states(report)
            )
            [redis_check] = [c for c in report["checks"] if c["name"] == "redis"]
            assert "role=master" in redis_check["detail"]
            assert "appendfsync=always" in redis_check["detail"]

            stack.kill_instance(0)  # kill -9 of the only instance
            code, report = run_status(env)
            assert code == 1
            assert states(report)[app_line] == "DOWN"
            assert states(report)[nginx_line] == "DOWN"  # nothing behind it answers
            assert states(report)["mail worker"] == "OK"

            mail.send_signal(signal.SIGTERM)  # a stopping worker deletes its health key
            mail.wait(30)
            code, report = run_status(env)
            assert code == 1
            assert states(report)["mail worker"] == "DOWN"
            assert states(report)["mail metrics"] == "DOWN"
        finally:
            stop_process(mail)


def test_status_reads_env_file_over_the_environment_with_make_runs_defaults(
    tmp_path: Path,
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("# comment\nexport REDIS_PORT=6390\nHTTP_PORT='9090'\nWEB_INSTANCES=3\n")
    env = stack_env({"REDIS_PORT": "1", "HTTP_PORT": "2", "SMTP_PORT": "2525"}, env_file)
    assert env["REDIS_URL"] == "redis://127.0.0.1:6390/0"  # derived as make run does
    assert env["HTTP_PORT"] == "9090"  # .env wins
    assert env["SMTP_PORT"] == "2525"
    assert env["SEED_PHONES_PORT"] == "5555"  # make run's default
