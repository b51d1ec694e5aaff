"""make run's port check (app/ops/ports.py), against real sockets holding real ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.ops.ports import DEFAULTS, needed_ports, problems

ROOT = Path(__file__).resolve().parent.parent
PORT_VARIABLES = (
    "REDIS_PORT",
    "HTTP_PORT",
    "SEED_PHONES_PORT",
    "SEED_ORDERS_PORT",
    "SMTP_PORT",
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _free_block(count: int) -> int:
    """The first of `count` consecutive ports that are free now."""
    for _ in range(50):
        base = _free_port()
        if base + count <= 65535 and all(_bindable(base + i) for i in range(count)):
            return base
    raise RuntimeError("no block of free ports")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture
def free_env() -> dict[str, str]:
    """make run's port variables, every one on a port free right now."""
    env = {name: str(_free_port()) for name in PORT_VARIABLES}
    env["APP_BASE_PORT"] = str(_free_block(2))
    env["WEB_INSTANCES"] = "2"
    return env


@pytest.fixture
def held() -> Iterator[socket.socket]:
    """A listening socket on a free port, as a system redis-server would hold 6379."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        yield listener


def _check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.ops.ports"],
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_port_of_the_stack_is_checked(free_env: dict[str, str]) -> None:
    needs = {need.variable: need.port for need in needed_ports(free_env)}
    base = int(free_env["APP_BASE_PORT"])
    assert needs == {
        **{name: int(free_env[name]) for name in PORT_VARIABLES},
        "APP_BASE_PORT": base,
        "APP_BASE_PORT (+1)": base + 1,
    }
    # A real SMTP server instead of the dev sink: its port is not ours to listen on.
    without_sink = needed_ports({**free_env, "SMTP_HOST": "smtp.example.com"})
    assert "SMTP_PORT" not in {need.variable for need in without_sink}
    # 0 turns a listener off.
    off = needed_ports({**free_env, "SEED_PHONES_PORT": "0"})
    assert "SEED_PHONES_PORT" not in {need.variable for need in off}


def test_the_default_redis_port_is_not_the_system_one() -> None:
    # Debian's redis-server package starts a system Redis on 6379 at install.
    assert DEFAULTS["REDIS_PORT"] != "6379"
    assert {need.variable: need.port for need in needed_ports({})}["REDIS_PORT"] == int(
        DEFAULTS["REDIS_PORT"]
    )


def test_free_ports_pass(free_env: dict[str, str]) -> None:
    result = _check(free_env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_a_held_port_names_itself_its_holder_and_its_variable(
    free_env: dict[str, str], held: socket.socket
) -> None:
    port = held.getsockname()[1]
    result = _check({**free_env, "REDIS_PORT": str(port)})
    assert result.returncode == 1
    assert f"port {port} (REDIS_PORT: redis-server) is already in use" in result.stderr
    # This test process holds it: the check finds it through /proc.
    assert f"Held by pid {os.getpid()}: " in result.stderr
    assert "REDIS_PORT=<another port> make run" in result.stderr
    # Only the held port is reported.
    assert result.stderr.count("already in use") == 1


def test_a_held_instance_port_names_app_base_port(free_env: dict[str, str]) -> None:
    base = int(free_env["APP_BASE_PORT"])
    with socket.socket() as second_instance:
        second_instance.bind(("127.0.0.1", base + 1))
        second_instance.listen(1)
        found = problems(needed_ports(free_env))
    assert len(found) == 1, found
    assert found[0].startswith(f"port {base + 1} (APP_BASE_PORT (+1): app instance 2 of 2) ")
    assert "set APP_BASE_PORT in .env" in found[0]


def test_a_port_asked_for_twice(free_env: dict[str, str]) -> None:
    found = problems(needed_ports({**free_env, "SMTP_PORT": free_env["HTTP_PORT"]}))
    assert found == [
        f"port {free_env['HTTP_PORT']} is asked for twice: HTTP_PORT (nginx, the whole API) "
        "and SMTP_PORT (the dev SMTP sink); give one of them another port."
    ]
