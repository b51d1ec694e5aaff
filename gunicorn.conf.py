"""gunicorn settings for one PhoneShop instance; every value comes from the environment.

Used unchanged by `make run` (app/ops/instances.py starts WEB_INSTANCES of these),
by the test stack (loadtests/support/stack.py) and by the Docker image's CMD:

    gunicorn --config gunicorn.conf.py

Defaults are mirrored in .env.example.
"""

import os
import re
import stat
import tempfile
from pathlib import Path

from app.env import SettingsError, env_int
from app.logs import logging_config


def _int(name: str, default: int, low: int = 1, high: int = 100_000) -> int:
    try:
        return env_int(os.environ, name, default, low, high)
    except SettingsError as error:
        raise SystemExit(f"gunicorn.conf.py: {error}") from None


# The app: a zero-argument async factory returning the aiohttp Application.
wsgi_app = "app.main:create_app"

# WEB_BIND: where this instance listens. app/ops/instances.py sets it per
# instance (127.0.0.1:8001, :8002, ...); the image sets 0.0.0.0:8000.
bind = [os.environ.get("WEB_BIND", "").strip() or "127.0.0.1:8000"]

# aiohttp's worker on uvloop: one event loop per worker process.
worker_class = "aiohttp.GunicornUVLoopWebWorker"

# WEB_CONCURRENCY worker processes, default one per core (measured: more than
# the core count buys nothing on this kind of box).
workers = _int("WEB_CONCURRENCY", os.cpu_count() or 1, high=512)

# Never preload: asyncio state (the Redis pool, the loop) cannot survive a
# fork, so every worker builds its own app and Redis client in cleanup_ctx.
preload_app = False

# Seconds an idle keep-alive connection stays open. aiohttp gets this as its
# keepalive_timeout. It must stay LONGER than nginx's upstream
# `keepalive_timeout 60s` (nginx/nginx.conf.template): otherwise the app closes
# a connection nginx is about to reuse and the client sees a 502.
keepalive = _int("WEB_KEEPALIVE", 75, low=61, high=3600)

# SIGTERM: stop accepting, let in-flight requests finish for up to this many
# seconds (aiohttp uses 95% of it as its shutdown timeout), then exit.
# It must stay SHORTER than every supervisor's stop grace, or the worker is
# SIGKILLed mid-request: honcho under `make run` waits a fixed 5 s before
# SIGKILL; docker-compose.yml gives the app `stop_grace_period: 10s`.
graceful_timeout = _int("WEB_GRACEFUL_TIMEOUT", 4, high=3600)

# A worker silent for this long is killed and replaced by the master
# (the aiohttp worker checks in every second, whatever its load).
timeout = _int("WEB_TIMEOUT", 30, high=3600)

# Logs: JSON lines on stdout (app/logs.py), gunicorn's own lines included, each
# carrying the request id being handled. gunicorn's access log is off: the app
# writes one JSON line per request itself (app/observe.py) with the route
# template, status, duration, client address and request id; never a header or
# the query string. WEB_ACCESS_LOG: "-" stdout (default), a path appends to
# that file (make run: var/log/web-access.log), "" turns those lines off.
accesslog = None
logconfig_dict = logging_config(
    level=os.environ.get("WEB_LOG_LEVEL", "").strip() or "info",
    access_log=os.environ.get("WEB_ACCESS_LOG", "-").strip(),
)

errorlog = "-"
loglevel = os.environ.get("WEB_LOG_LEVEL", "").strip() or "info"

# gunicorn >= 25.1 opens a control socket under ~/.gunicorn by default; the
# instances of one box would fight over it and nothing here uses it.
control_socket_disable = True

proc_name = "phoneshop-web"


# ---- metrics: prometheus-client multiprocess mode (app/metrics.py) -----------------
# Every worker writes its values to mmap'ed files in one folder per instance;
# GET /metrics sums them. PROMETHEUS_MULTIPROC_DIR names it; unset, each
# instance takes $TMPDIR/phoneshop-metrics-<uid>/<bind address>. The master sets
# it before it forks any worker (prometheus_client reads it once, at import,
# so nothing here imports prometheus_client before that) and empties it, so a
# restarted instance starts from zero instead of adding a dead run's values.


def _metrics_dir() -> Path:
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    if given:
        return Path(given)
    parent = Path(tempfile.gettempdir()) / f"phoneshop-metrics-{os.getuid()}"
    parent.mkdir(mode=0o700, exist_ok=True)
    info = parent.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise SystemExit(f"gunicorn.conf.py: {parent} is not a folder of this user")
    return parent / re.sub(r"[^A-Za-z0-9_.-]", "-", bind[0])


def _clear_metrics(directory: Path) -> None:
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)


def on_starting(server) -> None:
    directory = _metrics_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _clear_metrics(directory)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def child_exit(server, worker) -> None:
    # A dead worker's counters stay counted; its live gauges (in flight) go.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        _clear_metrics(Path(directory))
