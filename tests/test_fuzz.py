"""schemathesis against /openapi.json through nginx, every check enabled.

Two runs over a real stack: as the admin (every operation but placing orders,
which is a customer's) and as a customer (every operation). Whatever they find
is fixed in the app; the bench-only routes are left out (off in production).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests.support.stack import FullStack, start_full_stack
from tests.helpers import NO_SHEDDING_ENV

HERE = Path(__file__).resolve().parent
# Examples per operation and phase; 26 operations are tested in each run.
MAX_EXAMPLES = 12
HIGH_LIMITS = {
    "LIMIT_WRITE_RATE": "100000r/s",
    "LIMIT_WRITE_BURST": "100000",
    "LIMIT_READ_RATE": "100000r/s",
    "LIMIT_READ_BURST": "100000",
}


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullStack]:
    with start_full_stack(
        tmp_path_factory.mktemp("fuzz-stack"),
        instances=1,
        workers=2,
        # Fuzzing is not overload: a busy box must not turn a slow answer into a 503.
        env={**HIGH_LIMITS, **NO_SHEDDING_ENV},
    ) as stack:
        yield stack


def customer_token(stack: FullStack) -> str:
    request = urllib.request.Request(
        stack.direct_url + "/customers",
        data=json.dumps(
            {"name": "Fuzz", "surname": "Er", "email": "fuzz@example.com", "balance_cents": 10**9}
        ).encode(),
        headers={**stack.admin_headers, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["token"]


def schemathesis(stack: FullStack, token: str, *extra: str) -> subprocess.CompletedProcess:
    # The schemathesis CLI installed beside the Python running the tests.
    st = Path(sys.executable).parent / "st"
    return subprocess.run(
        [
            str(st),
            "--no-color",
            "--config-file",
            str(HERE / "schemathesis.toml"),
            "run",
            f"{stack.http_url}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            str(MAX_EXAMPLES),
            # One worker: CPython 3.11.7 can fail compile() under threads
            # ("AST constructor recursion depth mismatch") inside hypothesis.
            "--workers",
            "1",
            "--generation-database",
            "none",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=400,
        env={
            **os.environ,
            "FUZZ_TOKEN": token,
            "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
            "PYTHONPATH": str(HERE.parent),
        },
        cwd=HERE.parent,
        check=False,
    )


def report(result: subprocess.CompletedProcess) -> str:
    summary = result.stdout[result.stdout.find("SUMMARY") :]
    print(summary)  # the figures, in the test output
    cases = re.search(r"(\d+) generated", summary)
    assert cases and int(cases.group(1)) > 500, summary
    return summary


def test_schemathesis_as_admin(fuzz_stack: FullStack) -> None:
    # Placing an order is a customer's operation (the admin must name a customer).
    result = schemathesis(
        fuzz_stack,
        fuzz_stack.admin_token,
        "--exclude-operation-id-regex",
        "^(get_bench_.*|post_orders|post_orders_create)$",
    )
    summary = report(result)
    assert result.returncode == 0, result.stdout[-20000:]
    assert "Failures" not in summary


def test_schemathesis_as_customer(fuzz_stack: FullStack) -> None:
    result = schemathesis(
        fuzz_stack, customer_token(fuzz_stack), "--exclude-operation-id-regex", "^get_bench_.*$"
    )
    summary = report(result)
    assert result.returncode == 0, result.stdout[-20000:]
    assert "Failures" not in summary
