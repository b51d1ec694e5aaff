"""app/ops/poll.py: the one way the tests, the load runs and app/ops wait for a state."""

from __future__ import annotations

import itertools

import pytest

from app.ops.poll import wait_until, wait_until_async
from app.ops.redis_cluster import ClusterError, poll


def test_it_returns_what_the_check_found_once_it_is_truthy() -> None:
    answers = iter([None, 0, "", "found"])
    assert wait_until(lambda: next(answers), "the third answer", interval=0) == "found"


def test_a_state_never_reached_raises_the_callers_error_naming_it() -> None:
    calls = itertools.count()
    with pytest.raises(TimeoutError, match="waiting for the impossible"):
        wait_until(lambda: next(calls) < 0, "the impossible", 0.01, interval=0)
    assert next(calls) > 1  # it did poll, more than once
    with pytest.raises(ClusterError, match="waiting for a node"):
        poll(lambda: False, 0.01, "a node")


async def test_the_async_variant_takes_sync_and_async_checks() -> None:
    answers = iter([False, False, 7])

    async def later() -> int:
        return next(answers)

    assert await wait_until_async(later, "an awaited answer", interval=0) == 7
    assert await wait_until_async(lambda: "sync", "a plain answer") == "sync"
    with pytest.raises(AssertionError, match="waiting for nothing"):
        await wait_until_async(lambda: None, "nothing", 0.01, error=AssertionError)
