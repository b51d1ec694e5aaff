"""The whole stack as pytest fixtures (a plugin: conftest.py lists it in ``pytest_plugins``).

``full_stack``
    The session's stack, healed before each test: dead instances restarted,
    a stopped Redis started again, and nginx answering /readyz again. Tests may
    therefore kill, stop and restart things freely. State (Redis data, nginx's
    rate-limit buckets) is shared across the session: use fresh customers and
    tokens per test.

A stack of a test's own: ``start_full_stack`` (loadtests/support/stack.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loadtests.support.stack import FullStack, start_full_stack


@pytest.fixture(scope="session")
def full_stack_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullStack]:
    # The functional tests assert exact outcomes of bursts on a shared, busy
    # box: with the adaptive overload control on, a burst that queues behind
    # other test processes could be refused for waiting. tests/test_overload.py
    # runs it as in production.
    with start_full_stack(
        tmp_path_factory.mktemp("stack"), env={"OVERLOAD_ADAPTIVE": "0"}
    ) as stack:
        yield stack


@pytest.fixture
def full_stack(full_stack_session: FullStack) -> FullStack:
    """The session's stack, every process up and nginx serving, before each test."""
    full_stack_session.heal()
    return full_stack_session
