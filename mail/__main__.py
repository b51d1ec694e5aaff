"""``python -m mail``: run the mail worker until SIGTERM or SIGINT.

``python -m mail --check`` exits 0 when a worker's health key exists (the one
named by MAIL_WORKER_NAME or, when that is unset, one of the default-named
workers of this host, ``{hostname}-{pid}``), 1 otherwise: the compose health
check. Give each worker its own MAIL_WORKER_NAME, or none: two processes must
never share a name.

Logs are JSON lines on stdout (app/logs.py); each line about one mail carries
the request id of the order's event. With MAIL_METRICS_PORT set, GET /metrics
on that port answers the worker's Prometheus metrics (mail/metrics.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import replace

from app import keys
from app.logs import configure as configure_logging
from app.settings import SettingsError
from mail import metrics
from mail.settings import MailSettings, host_label
from mail.worker import MailWorker, connect_redis


async def run(settings: MailSettings) -> None:
    redis = connect_redis(settings)
    worker = MailWorker(settings, redis)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        await redis.aclose()


def glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


async def check(settings: MailSettings) -> bool:
    redis = connect_redis(settings)
    try:
        if os.environ.get("MAIL_WORKER_NAME", "").strip():
            return bool(await redis.exists(keys.mail_worker_alive(settings.worker_name)))
        # Unnamed workers are called {host}-{pid}: look for one on this host.
        pattern = keys.mail_worker_alive(f"{glob_escape(host_label())}-*")
        async for _ in redis.scan_iter(match=pattern, count=1000):
            return True
        return False
    finally:
        await redis.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m mail", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 0 when a worker is alive")
    args = parser.parse_args()
    configure_logging(os.environ.get("LOG_LEVEL", "").strip() or "INFO")
    try:
        settings = MailSettings.from_env()
    except SettingsError as error:
        print(f"mail worker: {error}", file=sys.stderr)
        return 2
    if args.check:
        alive = asyncio.run(check(settings))
        print("alive" if alive else "no live mail worker")
        return 0 if alive else 1
    if settings.metrics_port:
        port = metrics.serve(settings.metrics_address, settings.metrics_port)
        # The health key carries the port taken, so make status finds every worker's.
        settings = replace(settings, metrics_port=port)
        logging.getLogger("mail.worker").info(
            "metrics on http://%s:%d/metrics", settings.metrics_address, port
        )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(run(settings))
    else:
        uvloop.run(run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
