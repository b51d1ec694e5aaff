"""Smoke test of the load-test kit (loadtests/): a tiny Locust run through the real
stack (nginx -> 2 instances -> redis), then the verifier. It proves the
locustfile, the shapes and the verifier work; it asserts correctness only,
never timings (the thresholds are set out of reach on purpose)."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import secrets
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from redis import Redis

from app import keys
from loadtests import shapes, verify
from loadtests.__main__ import locust_command
from loadtests.support.stack import FullStack

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def locust_run(full_stack_session: FullStack, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two 4-second steps of a few users each, with little stock and money on purpose."""
    stack = full_stack_session
    stack.heal()
    out = tmp_path_factory.mktemp("locust")
    command = locust_command(
        stack.http_url,
        out,
        setup_host=stack.direct_url,
        extra=[
            "--customers=8",
            "--poor-share=0.5",
            "--phones=6",
            "--scarce-phones=2",
            "--scarce-stock=2",
            "--user-rate=4",
            "--step-users=3",
            "--step-seconds=4",
            "--steps=2",
            "--max-failure-ratio=0",
            "--max-p95-ms=600000",
            "--max-p99-ms=600000",
        ],
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "LOCUST_"))},
        "ADMIN_TOKEN": stack.admin_token,
        "PHONESHOP_SHAPE": "step",
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=90)
    ledger_path = out / "ledger.json"
    assert ledger_path.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return {
        "status": done.returncode,
        "log": done.stdout[-3000:] + done.stderr[-3000:],
        "out": out,
        "ledger": json.loads(ledger_path.read_text()),
        "stack": stack,
    }


def test_locust_run_classifies_and_reports(locust_run: dict) -> None:
    ledger = locust_run["ledger"]
    assert locust_run["status"] == 0, locust_run["log"]
    summary = ledger["summary"]
    assert summary["requests"] > 0
    assert summary["failures"] == 0, locust_run["log"]
    assert summary["missed"] == []
    # The two steps ran, in order, and every request landed in one of them.
    assert [p["phase"] for p in ledger["plan"]] == ["step-1", "step-2"]
    assert {"step-1", "step-2"} <= set(ledger["timeline"]["phases"])
    assert sum(p["requests"] for p in ledger["timeline"]["phases"].values()) == summary["requests"]
    # Orders were acknowledged, and the scarce phones ran out: 409 counted as a success.
    assert ledger["orders"]
    assert ledger["outcomes"].get("business_409", 0) > 0
    # Only a user stopped at the very end with a request in flight leaves one unresolved.
    assert ledger["unresolved_orders"] <= summary["requests"] // 20
    out: Path = locust_run["out"]
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust.html"):
        assert (out / name).stat().st_size > 0, name
    stats = (out / "locust_stats.csv").read_text()
    # Dynamic URLs are grouped under one name each.
    assert "/phones?page=[n]" in stats and "/phones/[id]" in stats
    assert "/orders/" not in stats.replace("/orders/[id]", "")


def _verify(locust_run: dict, ledger: dict) -> dict:
    stack = locust_run["stack"]
    return asyncio.run(verify.verify(ledger, stack.http_url, stack.admin_token))


def test_verifier_accepts_the_run(locust_run: dict) -> None:
    result = _verify(locust_run, locust_run["ledger"])
    assert result["ok"], json.dumps(result, indent=2)
    orders = result["checks"]["orders"]
    assert orders["acknowledged"] == len(locust_run["ledger"]["orders"])
    assert orders["missing_count"] == 0
    # Stored but never acknowledged: only requests whose answer nobody waited for.
    assert orders["extra_count"] <= locust_run["ledger"]["unresolved_orders"]


def test_verifier_catches_what_clients_were_not_told(locust_run: dict) -> None:
    ledger = copy.deepcopy(locust_run["ledger"])
    order_id, told = next(iter(ledger["orders"].items()))
    # A stored order nobody was told about, and an acknowledged one that is not stored.
    del ledger["orders"][order_id]
    ledger["orders"]["A" * 22] = {**told}
    result = _verify(locust_run, ledger)
    assert not result["ok"]
    assert result["checks"]["orders"]["extra_count"] == 1
    assert result["checks"]["orders"]["missing_count"] == 1


def test_verifier_catches_a_wrong_status(locust_run: dict) -> None:
    ledger = copy.deepcopy(locust_run["ledger"])
    order_id, told = next(iter(ledger["orders"].items()))
    told["status"] = "cancelled" if told["status"] != "cancelled" else "completed"
    result = _verify(locust_run, ledger)
    assert not result["ok"]
    assert [m["order_id"] for m in result["checks"]["statuses"]["mismatches"]] == [order_id]


def test_mail_check_finds_sent_and_missing_mails(full_stack: FullStack) -> None:
    mailed, unmailed = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    client = Redis.from_url(full_stack.redis.url)
    try:
        client.set(keys.mail_sent(mailed), "{}", ex=60)
        result = asyncio.run(verify.check_mail(full_stack.redis.url, [mailed, unmailed], 0))
    finally:
        client.delete(keys.mail_sent(mailed))
        client.close()
    assert result["mailed"] == 1
    assert result["without_mail"] == 1
    assert result["examples_without_mail"] == [unmailed]
    assert not result["ok"]


def _shape(cls: type[shapes.PhasedShape], **options: float) -> shapes.PhasedShape:
    shape = cls()
    shape.runner = SimpleNamespace(
        environment=SimpleNamespace(parsed_options=SimpleNamespace(**options))
    )
    return shape


def test_overflow_shape_offers_at_least_three_times_capacity_then_half() -> None:
    shape = _shape(
        shapes.Overflow,
        capacity_rps=100.0,
        user_rate=2.0,
        overload_factor=2.0,  # below 3 is raised to 3
        half_seconds=1.0,
        overload_seconds=1.0,
        recovery_seconds=1.0,
    )
    phases = shape.phases()
    assert [(name, users) for name, users, _ in phases] == [
        ("half", 25),
        ("overload", 150),
        ("recovery", 25),
    ]
    assert shape.tick()[0] == 25 and shape.current_phase == "half"
    shape.start_time -= 3.5  # past the last phase
    assert shape.tick() is None


def test_step_ramp_adds_users_per_step() -> None:
    shape = _shape(shapes.StepRamp, step_users=5, step_seconds=10.0, steps=3)
    assert [users for _, users, _ in shape.phases()] == [5, 10, 15]
    assert [p["end"] for p in shape.plan()] == [10.0, 20.0, 30.0]
    shape.start_time -= 15
    assert shape.tick()[0] == 10 and shape.current_phase == "step-2"
