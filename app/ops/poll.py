"""Waiting for a state by polling it: the one helper of the tests, the load runs and app/ops.

A wait is for a condition with a generous deadline, never a sleep of a guessed
length; the deadline only ends a wait that will not succeed, it asserts no timing.
``check`` returns something truthy once the state is reached, and that is returned.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

INTERVAL = 0.05


def _timed_out(error: type[BaseException], what: str, seconds: float) -> BaseException:
    return error(f"timed out after {seconds:g}s waiting for {what}")


def wait_until(
    check: Callable[[], Any],
    what: str = "the condition",
    seconds: float = 60.0,
    *,
    interval: float = INTERVAL,
    error: type[BaseException] = TimeoutError,
) -> Any:
    """Call ``check`` until it returns something truthy, and return that; ``error`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise _timed_out(error, what, seconds)
        time.sleep(interval)


async def wait_until_async(
    check: Callable[[], Awaitable[Any] | Any],
    what: str = "the condition",
    seconds: float = 60.0,
    *,
    interval: float = INTERVAL,
    error: type[BaseException] = TimeoutError,
) -> Any:
    """``wait_until`` in a running loop: ``check`` may be sync or return an awaitable."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise _timed_out(error, what, seconds)
        await asyncio.sleep(interval)
