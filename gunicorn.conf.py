"""gunicorn settings for one PhoneShop instance; every value comes from the environment.

Used unchanged by `make run` (nginx/instances.py starts WEB_INSTANCES of these),
by the test stack (tests/stack.py) and by the Docker image's CMD:

    gunicorn --config gunicorn.conf.py

Defaults are mirrored in .env.example.
"""

import os


def _int(name: str, default: int, low: int = 1, high: int = 100_000) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isascii() or not raw.isdigit() or not low <= int(raw) <= high:
        raise SystemExit(f"gunicorn.conf.py: {name} must be an integer from {low} to {high}")
    return int(raw)


# The app: a zero-argument async factory returning the aiohttp Application.
wsgi_app = "app.main:create_app"

# WEB_BIND: where this instance listens. nginx/instances.py sets it per
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

# Access log in aiohttp's format (the aiohttp worker rejects gunicorn's %(h)s
# style). "-" is stdout; WEB_ACCESS_LOG may name a file instead ("" = off).
# %a is the client address (the app takes it from nginx's X-Forwarded-For when
# BEHIND_PROXY), %Tf the time taken, and the request id ties the line to
# nginx's JSON log. The Authorization header is never logged.
_access_log = os.environ.get("WEB_ACCESS_LOG", "-").strip()
accesslog = _access_log or None
access_log_format = '%a %t "%r" %s %b %Tf "%{X-Request-ID}i" "%{User-Agent}i"'

errorlog = "-"
loglevel = os.environ.get("WEB_LOG_LEVEL", "").strip() or "info"

# gunicorn >= 25.1 opens a control socket under ~/.gunicorn by default; the
# instances of one box would fight over it and nothing here uses it.
control_socket_disable = True

proc_name = "phoneshop-web"
