"""Which key layout (app/keys.py) a Redis holds, checked before the app serves it.

The partitioned layout renamed every key, so this version would see an older
database as an empty shop, and writing to it would leave two half-shops in one
Redis. ``make run``'s web launcher (app/ops/instances.py) calls ``check_at_start``
before it starts any instance:

* the ``layout`` key says this version: go on;
* no ``layout`` key and none of the old layout's keys (``ledger``, ``phones``, ...):
  a fresh database, so write ``layout`` (the first start) and go on;
* an old layout's keys without ``layout``, or another version: refuse, saying what to
  do. There is no migration yet: start from a fresh data directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from redis import Redis
from redis.exceptions import RedisError

from app import keys
from app.ops.poll import wait_until
from app.settings import Settings, SettingsError, redacted_url, redis_url_from_env

# make run starts redis-server beside the launcher: how long to wait for it to answer.
REDIS_WAIT_S = 30.0


class LayoutError(RuntimeError):
    """This Redis holds another layout; the message says what to do."""


def refusal(found: str) -> str:
    return (
        f"this Redis holds data in an older key layout ({found}); this version uses "
        f"layout {keys.LAYOUT_VERSION}: every key in one of 128 partitions "
        "(docs/data-tier.md, section 2). It would serve an empty shop beside the old one, "
        "so it does not start. There is no migration yet: start from a fresh data "
        "directory (stop make run, then `mv var/redis var/redis.old-layout` and make run "
        "again; or point REDIS_URL at an empty Redis). Keep the old directory to read "
        "the old data with the previous version of PhoneShop."
    )


def check_layout(redis: Redis) -> bool:
    """True when this call wrote the marker (a fresh database); LayoutError when the
    data is of another layout."""
    found = redis.get(keys.LAYOUT)
    if found is None:
        old = [key for key in keys.OLD_LAYOUT_KEYS if redis.exists(key)]
        if old:
            raise LayoutError(refusal("keys " + ", ".join(old) + f" and no {keys.LAYOUT!r} key"))
        if redis.set(keys.LAYOUT, keys.LAYOUT_VERSION, nx=True):
            return True
        found = redis.get(keys.LAYOUT)  # another starting instance wrote it first
    if found != str(keys.LAYOUT_VERSION).encode():
        raise LayoutError(refusal(f"{keys.LAYOUT!r} is {found!r}"))
    return False


def check_at_start(env: Mapping[str, str] | None = None) -> str | None:
    """None when the app may start; otherwise why not (for the launcher to print)."""
    env = os.environ if env is None else env
    try:
        url = redis_url_from_env(env, Settings.redis_url)
    except SettingsError as error:
        return str(error)
    redis = Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)

    def answers() -> bool:
        try:
            return bool(redis.ping())
        except RedisError:
            return False

    try:
        wait_until(answers, f"Redis at {redacted_url(url)}", REDIS_WAIT_S)
        check_layout(redis)
    except TimeoutError as error:
        return f"{error}: the key layout check needs it before any instance starts"
    except LayoutError as error:
        return str(error)
    finally:
        redis.close()
    return None
