"""The app instances nginx balances over, and the launcher `make run` uses.

``python -m app.ops.instances`` (the Procfile's ``web`` line) starts
``WEB_INSTANCES`` gunicorn instances (default 2), instance ``i`` listening on
``127.0.0.1:APP_BASE_PORT+i`` (default 8001, 8002, ...), each with
``gunicorn.conf.py`` and so ``WEB_CONCURRENCY`` workers.

It is a small supervisor, stdlib only:

* SIGTERM or SIGINT is forwarded to every instance as SIGTERM (a graceful stop:
  finish what is in flight, close Redis); the launcher exits once all of them
  did. Instances that outlive ``WEB_GRACEFUL_TIMEOUT`` + 5 s are killed.
* An instance that dies (say ``kill -9`` of its master, to watch nginx fail
  over) is started again after a second. One that keeps dying right after
  starting (an import error, a port in use) stops the launcher with status 1,
  and honcho then stops the whole stack instead of looping.
* Before the first instance it checks the key layout of the data (app/layout.py):
  an older layout's data stops the launcher with status 2 and the message
  saying what to do, and honcho then stops the whole stack.
* On Linux every instance gets PR_SET_PDEATHSIG, so even a SIGKILLed launcher
  leaves no orphan behind (honcho also signals the whole process group).

Ports are computed here and nowhere else: ``nginx/render.py`` reads the same
function to write the upstream block.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from app.env import env_int

ROOT = Path(__file__).resolve().parents[2]
GUNICORN_CONF = ROOT / "gunicorn.conf.py"
DEFAULT_INSTANCES = 2
DEFAULT_BASE_PORT = 8001
RESTART_DELAY = 1.0
# An instance that dies sooner than this after starting counts as a crash loop.
MIN_UPTIME = 10.0
MAX_QUICK_DEATHS = 3


def instance_ports(env: Mapping[str, str] | None = None) -> list[int]:
    """Ports of the local instances: APP_BASE_PORT, APP_BASE_PORT+1, ..."""
    env = os.environ if env is None else env
    count = env_int(env, "WEB_INSTANCES", DEFAULT_INSTANCES, 1, 64, error=SystemExit)
    base = env_int(env, "APP_BASE_PORT", DEFAULT_BASE_PORT, 1, 65535 - count + 1, error=SystemExit)
    return [base + i for i in range(count)]


def gunicorn_argv(python: str = sys.executable) -> list[str]:
    """The one command every instance runs (make run, the test stack, the image)."""
    return [python, "-m", "gunicorn", "--config", str(GUNICORN_CONF)]


def mail_argv(*args: str, python: str = sys.executable) -> list[str]:
    """The mail worker as the tests and load runs start it (the Procfile's mail line); ``args``: e.g. --check."""
    return [python, "-m", "mail", *args]


def mail_sink_argv(python: str = sys.executable) -> list[str]:
    """The dev SMTP sink as the tests and load runs start it (the Procfile's smtp line)."""
    return [python, "-m", "mail.sink"]


def instance_env(port: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
    merged = dict(os.environ if env is None else env)
    merged["WEB_BIND"] = f"127.0.0.1:{port}"
    return merged


def die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to the child when its parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_instance(port: int, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    preexec = die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.Popen(  # preexec_fn is safe: the launcher runs no threads
        gunicorn_argv(),
        cwd=ROOT,
        env=instance_env(port, env),
        preexec_fn=preexec,
    )


def _log(message: str) -> None:
    print(f"[instances] {message}", file=sys.stderr, flush=True)


def main() -> int:
    ports = instance_ports()
    graceful = env_int(os.environ, "WEB_GRACEFUL_TIMEOUT", 4, 1, 3600, error=SystemExit)
    # Imported here: the rest of this module (instance_ports, which nginx/render.py
    # reads) stays stdlib only.
    from app.layout import check_at_start

    refused = check_at_start()
    if refused is not None:
        _log(f"not starting: {refused}")
        return 2
    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    procs: dict[int, subprocess.Popen] = {}
    started: dict[int, float] = {}
    quick_deaths: dict[int, int] = dict.fromkeys(ports, 0)
    for port in ports:
        procs[port] = start_instance(port)
        started[port] = time.monotonic()
    _log("instances on " + ", ".join(f"127.0.0.1:{p}" for p in ports))

    status = 0
    while not stop_requested:
        for port, proc in procs.items():
            code = proc.poll()
            if code is None:
                continue
            uptime = time.monotonic() - started[port]
            quick_deaths[port] = quick_deaths[port] + 1 if uptime < MIN_UPTIME else 0
            if quick_deaths[port] >= MAX_QUICK_DEATHS:
                _log(f"instance on port {port} keeps dying (last status {code}); giving up")
                stop_requested = True
                status = 1
                break
            _log(f"instance on port {port} exited with {code}; restarting it")
            time.sleep(RESTART_DELAY)
            if stop_requested:
                break
            procs[port] = start_instance(port)
            started[port] = time.monotonic()
        else:
            time.sleep(0.2)

    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + graceful + 5
    for proc in procs.values():
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _log("all instances stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())
