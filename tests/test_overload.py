"""Overload control (app/overload.py): what is refused, what is served, and that
probes always pass.

The controller's decisions are checked two ways, neither asserting a timing:
on the controller itself with a clock the test moves (latency and waits are
then exact inputs), and on real processes (redis-server made slow with DEBUG
SLEEP, a gunicorn worker stopped with SIGSTOP, nginx stamping X-Request-Start),
where the test polls for the states it expects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import redis
from aiohttp.test_utils import TestClient

from app import appkeys
from app.main import create_app
from app.ops.poll import wait_until_async
from app.overload import (
    REFUSED_LIMIT,
    REFUSED_QUEUE,
    OverloadControl,
    Priority,
    priority_of,
    queue_delay,
)
from app.settings import Settings
from loadtests.support.stack import FullStack, start_full_stack
from tests.helpers import Shop

PROBLEM = "application/problem+json"
TIMEOUT = aiohttp.ClientTimeout(total=30)
DEADLINE = 60.0


class Clock:
    """time.monotonic for the controller, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def controller(**settings: Any) -> tuple[OverloadControl, Clock]:
    clock = Clock()
    base = Settings(max_inflight=64, overload_min_limit=4, overload_window_ms=100)
    return OverloadControl(dataclasses.replace(base, **settings), clock=clock), clock


def run_window(
    control: OverloadControl,
    clock: Clock,
    latency: float,
    concurrent: int = 10,
    priority: Priority = Priority.READ,
    waited: float = 0.0,
) -> Counter[str]:
    """``concurrent`` requests arrive together and finish after ``latency``; then
    the window ends. Returns what was admitted and refused."""
    outcome: Counter[str] = Counter()
    admitted = 0
    for _ in range(concurrent):
        refused = control.admit(priority, waited)
        outcome[refused or "admitted"] += 1
        admitted += refused is None
    for _ in range(admitted):
        control.done("/phones/{id}", latency)
    clock.now += control.window
    control.admit(Priority.READ, 0.0)  # the next arrival closes the window
    control.done("/phones/{id}", latency)
    return outcome


# ---- the controller, with a clock the test moves ------------------------------------


def test_limit_shrinks_under_rising_latency_and_grows_back_after() -> None:
    control, clock = controller()
    assert control.limit == 64  # a burst on an idle worker is served
    for _ in range(10):
        assert run_window(control, clock, latency=0.002) == {"admitted": 10}
    assert control.limit == 64

    # The same traffic, ten times slower (a slow Redis): the limit comes down.
    limits = []
    for _ in range(10):
        run_window(control, clock, latency=0.02)
        limits.append(control.limit)
    assert limits == sorted(limits, reverse=True) and limits[-1] < 16
    # Past the shrunken limit new requests are refused, not queued.
    outcome = run_window(control, clock, latency=0.02, concurrent=40)
    assert outcome[REFUSED_LIMIT] > 0 and outcome["admitted"] <= int(limits[-1]) + 1
    assert int(control.retry_after) >= 1

    # Latency back to normal: the limit climbs back to MAX_INFLIGHT.
    for _ in range(60):
        run_window(control, clock, latency=0.002)
    assert control.limit == 64
    assert run_window(control, clock, latency=0.002, concurrent=40) == {"admitted": 40}


def test_overload_does_not_teach_the_baseline_that_slow_is_normal() -> None:
    control, clock = controller()
    for _ in range(10):
        run_window(control, clock, latency=0.002)
    # Sustained slowness with refusals in every window: the limit stays down.
    for _ in range(100):
        run_window(control, clock, latency=0.02, concurrent=40)
    assert control.limit < 16


def test_priorities_share_the_limit() -> None:
    control, _ = controller(max_inflight=10)
    assert priority_of("GET", "/healthz", "/healthz") == Priority.PROBE
    assert priority_of("GET", "/readyz", "/readyz") == Priority.PROBE
    assert priority_of("POST", "/orders/x/check", "/orders/{id}/check") == Priority.FINISH
    assert priority_of("POST", "/orders/x/cancel", "/orders/{id}/cancel") == Priority.FINISH
    assert priority_of("POST", "/phones/check/x", "/phones/check/{id}") == Priority.FINISH
    assert priority_of("GET", "/phones", "/phones") == Priority.READ
    assert priority_of("POST", "/orders", "/orders") == Priority.NEW
    assert priority_of("POST", "/customers/x/deposit", "/customers/{id}/deposit") == Priority.NEW

    admitted = Counter()
    for priority in (Priority.NEW, Priority.READ, Priority.FINISH):
        while control.admit(priority, 0.0) is None:
            admitted[priority] += 1
    # New work fills 8 of 10 slots, reads one more, completing orders the last.
    assert admitted == {Priority.NEW: 8, Priority.READ: 1, Priority.FINISH: 1}
    assert control.current == 10


def test_a_standing_queue_is_refused_a_burst_is_not() -> None:
    control, clock = controller(overload_queue_target_min_ms=5, overload_queue_interval_ms=100)
    target = control.target
    assert target == 0.005
    # A burst: waits above the target for less than an interval are served.
    for _ in range(5):
        assert control.admit(Priority.NEW, 0.050) is None
        clock.now += 0.010
    assert not control.dropping
    # The waits stay above the target for a whole interval: a standing queue.
    for _ in range(8):
        control.admit(Priority.NEW, 0.050)
        clock.now += 0.010
    assert control.dropping
    assert control.admit(Priority.NEW, 0.050) == REFUSED_QUEUE
    assert control.admit(Priority.READ, 0.050) == REFUSED_QUEUE
    # Completing an order may wait the whole interval; not longer.
    assert control.admit(Priority.FINISH, 0.050) is None
    assert control.admit(Priority.FINISH, 0.150) == REFUSED_QUEUE
    # One wait under the target: the queue emptied, nothing is refused for waiting.
    assert control.admit(Priority.NEW, 0.001) is None
    assert not control.dropping
    assert control.admit(Priority.NEW, 0.050) is None
    # Ten intervals is too long in any state.
    assert control.admit(Priority.FINISH, 1.5) == REFUSED_QUEUE


def test_retry_after_grows_with_the_refused_demand() -> None:
    answers = {}
    for overload in (1, 3, 10):
        control, clock = controller(max_inflight=10, overload_adaptive=False)
        for _ in range(20):
            run_window(control, clock, latency=0.002, concurrent=10 * overload)
        answers[overload] = int(control.retry_after)
    assert answers[1] == 1
    assert 2 <= answers[3] < answers[10] <= 60


def test_queue_delay_reads_only_a_sane_stamp() -> None:
    assert queue_delay("t=1000.250", 1000.5) == pytest.approx(0.25)
    for bad in (None, "", "1000.2", "t=", "t=abc", "t=nan", "t=1001", "t=1", "t=inf"):
        assert queue_delay(bad, 1000.5) == 0.0, bad


# ---- in-process app, real Redis: priorities at the limit -------------------------------


async def test_at_the_limit_checks_pass_new_orders_are_refused_and_probes_answer(
    aiohttp_client: Any, app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAX_INFLIGHT", "10")
    client: TestClient = await aiohttp_client(await create_app())
    shop = Shop(client)
    phone = await shop.phone(stock=10)
    _, auth = await shop.customer()
    placed = await shop.order(auth, [(phone["id"], 1)], autocheck=False)
    assert placed.status == 201
    order_id = (await placed.json())["order"]["id"]

    control = client.app[appkeys.INFLIGHT]
    # Nine slow reads hold the slots new work and reads may use (3 s: the checks below
    # take milliseconds; the assertion after them says if the reads ended first).
    slow = [
        asyncio.create_task(client.get("/bench/sleep", params={"ms": "3000"})) for _ in range(9)
    ]
    await wait_until_async(lambda: control.current == 9, "nine slow reads in flight")

    refused = await shop.order(auth, [(phone["id"], 1)])
    assert refused.status == 503
    assert (await refused.json(content_type=PROBLEM))["code"] == "overloaded"
    assert int(refused.headers["Retry-After"]) >= 1
    read = await client.get(f"/phones/{phone['id']}")
    assert read.status == 503
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert (await client.get(probe)).status == 200, probe
    checked = await client.post(f"/orders/{order_id}/check", headers=auth)
    assert checked.status == 200
    assert (await checked.json())["order"]["status"] == "completed"
    assert control.current == 9, "the slow reads ended before the checks did"

    assert [(await task).status for task in slow] == [200] * 9
    assert control.current == 0
    assert (await shop.order(auth, [(phone["id"], 1)])).status == 201


# ---- real processes: a slow Redis, a stopped worker -------------------------------------


@pytest.fixture(scope="module")
def one_worker_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullStack]:
    """nginx, 1 instance x 1 worker (so its /metrics is that worker's), redis."""
    directory = Path(tmp_path_factory.mktemp("overload"))
    with start_full_stack(
        directory,
        instances=1,
        workers=1,
        # Reached directly, not through nginx's cap: the limit may come down to 4.
        env={"MAX_INFLIGHT": "64", "REDIS_TIMEOUT": "10", "OVERLOAD_MIN_LIMIT": "4"},
    ) as stack:
        yield stack


async def overload_limit(http: aiohttp.ClientSession, stack: FullStack) -> float:
    async with http.get(f"{stack.direct_url}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith("phoneshop_overload_limit "):
                return float(line.split()[1])
    raise AssertionError("no phoneshop_overload_limit in /metrics")


async def new_phone(http: aiohttp.ClientSession, stack: FullStack) -> str:
    async with http.post(
        f"{stack.direct_url}/phones",
        json={"name": "Pixel", "price_cents": 100, "stock": 1},
        headers=stack.admin_headers,
    ) as response:
        assert response.status == 201
        return (await response.json())["phone"]["id"]


async def test_slow_redis_shrinks_the_limit_refuses_fast_and_recovers(
    one_worker_stack: FullStack,
) -> None:
    stack = one_worker_stack
    stop_readers = asyncio.Event()
    readers_wanted = [4]
    answers: Counter[tuple[int, str]] = Counter()
    retry_afters: set[int] = set()

    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        url = f"{stack.direct_url}/phones/{await new_phone(http, stack)}"

        async def reader(n: int) -> None:
            while not stop_readers.is_set():
                if n >= readers_wanted[0]:
                    await asyncio.sleep(0.01)  # an idle reader, not yet wanted: pacing
                    continue
                async with http.get(url) as response:
                    code = ""
                    if response.status == 503:
                        code = (await response.json(content_type=PROBLEM))["code"]
                        retry_afters.add(int(response.headers["Retry-After"]))
                    else:
                        await response.read()
                    answers[response.status, code] += 1

        readers = [asyncio.create_task(reader(n)) for n in range(32)]
        await wait_until_async(lambda: answers[200, ""] >= 300, "normal reads served")
        await wait_until_async(
            lambda: limit_at_least(http, stack, 60), "the limit at its ceiling under light traffic"
        )

        # A latency script: Redis blocks 50 ms at a time, over and over.
        slow = threading.Event()
        slow.set()

        def sleepy_redis() -> None:
            client = redis.Redis.from_url(stack.redis.url)
            try:
                while slow.is_set():
                    client.execute_command("DEBUG", "SLEEP", "0.05")
            finally:
                client.close()

        sleeper = threading.Thread(target=sleepy_redis)
        sleeper.start()
        readers_wanted[0] = 32
        try:
            await wait_until_async(
                lambda: limit_at_most(http, stack, 16), "the limit came down under slow Redis"
            )
            await wait_until_async(
                lambda: answers[503, "overloaded"] > 0, "reads refused at the limit"
            )
            # Probes pass while the worker refuses reads, directly and through nginx.
            for base in (stack.direct_url, stack.http_url):
                for probe in ("/healthz", "/readyz"):
                    async with http.get(f"{base}{probe}") as response:
                        assert response.status == 200, (base, probe)
        finally:
            slow.clear()
            await asyncio.to_thread(sleeper.join)

        # Redis is fast again, the traffic light as before: the limit grows back.
        readers_wanted[0] = 4
        await wait_until_async(
            lambda: limit_at_least(http, stack, 60), "the limit grew back after Redis recovered"
        )
        served_before = answers[200, ""]
        await wait_until_async(
            lambda: answers[200, ""] >= served_before + 100, "reads served again"
        )
        stop_readers.set()
        await asyncio.gather(*readers)

    # Nothing but served reads and fast refusals, each with a Retry-After.
    assert set(answers) <= {(200, ""), (503, "overloaded")}, answers
    assert retry_afters and min(retry_afters) >= 1


async def limit_at_most(http: aiohttp.ClientSession, stack: FullStack, value: float) -> bool:
    return await overload_limit(http, stack) <= value


async def limit_at_least(http: aiohttp.ClientSession, stack: FullStack, value: float) -> bool:
    v = await overload_limit(http, stack)
    print("limit", v, flush=True)
    return v >= value


async def test_requests_that_queued_behind_a_stopped_worker_are_refused_probes_are_not(
    one_worker_stack: FullStack,
) -> None:
    stack = one_worker_stack
    [instance] = stack.instances
    assert instance.proc is not None
    [worker] = psutil.Process(instance.proc.pid).children()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        url = f"{stack.http_url}/phones/{await new_phone(http, stack)}"

        async def get(target: str) -> tuple[int, str]:
            async with http.get(target) as response:
                if response.status == 503:
                    return 503, (await response.json(content_type=PROBLEM))["code"]
                await response.read()
                return response.status, ""

        os.kill(worker.pid, signal.SIGSTOP)
        try:
            queued = [asyncio.create_task(get(url)) for _ in range(20)]
            probe = asyncio.create_task(get(f"{stack.http_url}/healthz"))
            # The fault itself: the worker stays stopped for twice the longest
            # wait any request may have had (10 x the 100 ms interval), while
            # nginx has handed it the requests.
            await asyncio.sleep(2.0)
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        answers = await asyncio.gather(*queued)
        # Every read waited past the longest allowed wait: refused, not served late.
        assert answers == [(503, "queued_too_long")] * 20
        # The probe waited as long, and passed.
        assert await probe == (200, "")
        # The backlog is gone: fresh requests are served.
        assert await get(url) == (200, "")
