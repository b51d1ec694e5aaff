"""``python -m mail``: run the mail worker until SIGTERM or SIGINT.

``python -m mail --check`` exits 0 when a worker's health key exists (the one
named by MAIL_WORKER_NAME, or any worker's when that is unset), 1 otherwise:
the compose health check.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from app import keys
from app.settings import SettingsError
from mail.settings import MailSettings
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


async def check(settings: MailSettings) -> bool:
    redis = connect_redis(settings)
    try:
        if os.environ.get("MAIL_WORKER_NAME", "").strip():
            return bool(await redis.exists(keys.mail_worker_alive(settings.worker_name)))
        async for _ in redis.scan_iter(match=keys.MAIL_WORKER_ALIVE_PATTERN, count=100):
            return True
        return False
    finally:
        await redis.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m mail", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 0 when a worker is alive")
    args = parser.parse_args()
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = MailSettings.from_env()
    except SettingsError as error:
        print(f"mail worker: {error}", file=sys.stderr)
        return 2
    if args.check:
        alive = asyncio.run(check(settings))
        print("alive" if alive else "no live mail worker")
        return 0 if alive else 1
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(run(settings))
    else:
        uvloop.run(run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
