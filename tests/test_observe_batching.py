"""Metric updates and access lines batched per event-loop turn (app/metrics.py,
app/logs.py): the same figures and lines as writing each at once, written at the
end of the turn, and at once when batching is off or no loop runs."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from app import metrics
from app.logs import (
    AccessLogHandler,
    DirectAccessLog,
    JsonFormatter,
    request_id_var,
    set_batching,
)
from app.settings import Settings

BUCKETS = (0.001, 0.01, 0.1, 1.0)
VALUES = (0.0005, 0.001, 0.0011, 0.05, 0.1, 0.7, 3.0, 250.0, 0.0)


@pytest.fixture(autouse=True)
def batching_restored() -> Iterator[None]:
    yield
    metrics.set_batching(True)
    set_batching(True)


def samples(registry: CollectorRegistry, name: str) -> dict[tuple, float]:
    found = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.startswith(name) and not sample.name.endswith("_created"):
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def pair() -> tuple[CollectorRegistry, Histogram, Histogram]:
    registry = CollectorRegistry()
    direct = Histogram("direct_seconds", "d", ["route"], buckets=BUCKETS, registry=registry)
    batched = Histogram("batched_seconds", "b", ["route"], buckets=BUCKETS, registry=registry)
    return registry, direct, batched


def renamed(found: dict[tuple, float], old: str, new: str) -> dict[tuple, float]:
    return {(name.replace(old, new), labels): v for (name, labels), v in found.items()}


async def test_a_batched_histogram_equals_observing_each_value() -> None:
    registry, direct, batched = pair()
    updates = metrics.Children(batched)
    for value in VALUES:
        direct.labels("/orders").observe(value)
        updates("/orders").observe(value)

    before_turn = samples(registry, "batched_seconds")
    await asyncio.sleep(0)  # one loop turn: the scheduled write runs first
    after_turn = samples(registry, "batched_seconds")

    assert before_turn[("batched_seconds_count", (("route", "/orders"),))] == 0
    assert renamed(after_turn, "batched", "direct") == samples(registry, "direct_seconds")
    assert after_turn[("batched_seconds_count", (("route", "/orders"),))] == len(VALUES)


async def test_counters_are_summed_within_a_turn_and_written_at_its_end() -> None:
    registry = CollectorRegistry()
    counter = Counter("things_total", "t", registry=registry)
    updates = metrics.CounterUpdates(counter)
    for _ in range(5):
        updates.inc()
    updates.inc(2.5)
    assert counter._value.get() == 0
    await asyncio.sleep(0)  # one loop turn: what is under test is the write at its end
    assert counter._value.get() == 7.5


async def test_without_batching_every_update_is_written_at_once() -> None:
    registry, direct, batched = pair()
    metrics.set_batching(False)
    updates = metrics.Children(batched)
    for value in VALUES:
        direct.labels("/x").observe(value)
        updates("/x").observe(value)
    assert renamed(samples(registry, "batched_seconds"), "batched", "direct") == samples(
        registry, "direct_seconds"
    )


def test_without_a_running_loop_updates_are_written_at_once() -> None:
    registry = CollectorRegistry()
    counter = Counter("sync_total", "s", registry=registry)
    metrics.CounterUpdates(counter).inc(3)
    assert counter._value.get() == 3


def test_a_scrape_writes_the_pending_updates_first() -> None:
    counter = metrics.Children(metrics.HTTP_REQUESTS)("GET", "/batching-test", "200")
    loop = asyncio.new_event_loop()
    try:

        async def request_then_scrape() -> bytes:
            counter.inc()  # pending until the end of this turn
            text, _ = await metrics.scrape(None)
            return text

        text = loop.run_until_complete(request_then_scrape())
    finally:
        loop.close()
    line = next(
        line
        for line in text.decode().splitlines()
        if line.startswith("phoneshop_http_requests_total{") and "/batching-test" in line
    )
    assert line.endswith(" 1.0")


# ---- the access log ------------------------------------------------------------------------


def access_logger(path: Path) -> tuple[logging.Logger, AccessLogHandler]:
    handler = AccessLogHandler(str(path))
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"test.access.{path.name}")
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, handler


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_access_lines_of_a_turn_are_written_together_at_its_end(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    logger, handler = access_logger(path)
    try:
        for n in range(3):
            logger.info("GET /phones %d", 200, extra={"route": "/phones", "n": n})
        assert path.read_text() == ""
        await asyncio.sleep(0)  # one loop turn: what is under test is the write at its end
        written = lines(path)
        assert [line["n"] for line in written] == [0, 1, 2]
        assert written[0]["message"] == "GET /phones 200" and written[0]["route"] == "/phones"
    finally:
        handler.close()


async def test_access_lines_are_written_at_once_without_batching(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    logger, handler = access_logger(path)
    set_batching(False)
    try:
        logger.info("one")
        assert [line["message"] for line in lines(path)] == ["one"]
    finally:
        handler.close()


def test_a_direct_access_line_is_the_line_logging_writes(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    logger, handler = access_logger(path)
    fields = {"method": "POST", "route": "/orders", "path": "/orders", "status": 201}
    fields |= {"duration_ms": 3.5, "remote": "127.0.0.1", "bytes": 412, "replayed": True}
    token = request_id_var.set("5f0c" * 8)
    try:  # no running loop: each line written at once
        logger.info("%s %s %d", "POST", "/orders", 201, extra=fields)
        assert DirectAccessLog(logger).write("POST /orders 201", fields)
        via_logging, direct = lines(path)
    finally:
        request_id_var.reset(token)
        handler.close()
    assert direct.pop("time")[:16] == via_logging.pop("time")[:16]  # the same minute
    assert list(direct.items()) == list(via_logging.items())  # members, values and order
    assert direct["request_id"] == "5f0c" * 8 and direct["status"] == 201


def test_a_direct_access_line_leaves_any_other_setup_to_logging(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    logger, handler = access_logger(path)
    try:
        logger.addFilter(lambda record: False)
        assert not DirectAccessLog(logger).write("GET / 200", {"status": 200})
        logger.filters.clear()
        logger.propagate = True
        assert not DirectAccessLog(logger).write("GET / 200", {"status": 200})
        logger.propagate = False
        plain = logging.StreamHandler()
        plain.setFormatter(JsonFormatter())
        logger.handlers = [plain]
        assert not DirectAccessLog(logger).write("GET / 200", {"status": 200})
        assert path.read_text() == ""
    finally:
        handler.close()


def test_a_rotated_access_log_is_reopened(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    logger, handler = access_logger(path)
    handler.rotation_check_s = 0.0  # check on every write
    try:
        logger.info("before")  # no running loop: written at once
        path.rename(tmp_path / "access.log.1")
        logger.info("after")
        assert [line["message"] for line in lines(tmp_path / "access.log.1")] == ["before"]
        assert [line["message"] for line in lines(path)] == ["after"]
    finally:
        handler.close()


def test_observe_batching_setting() -> None:
    base = {"ADMIN_TOKEN": "x" * 20}
    assert Settings.from_env(base).observe_batching is True
    assert Settings.from_env({**base, "OBSERVE_BATCHING": "0"}).observe_batching is False
