"""iso_time (app/timestamps.py): the API's times, ISO 8601 in UTC to the millisecond."""

from __future__ import annotations

import datetime as dt
import random

from app.timestamps import iso_time

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def expected(ms: int) -> str:
    # Exact integer arithmetic: what the answer must say for that millisecond.
    moment = EPOCH + dt.timedelta(milliseconds=ms)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_iso_time_is_the_utc_millisecond() -> None:
    assert iso_time("1764650000123") == "2025-12-02T04:33:20.123Z"
    assert iso_time(0) == "1970-01-01T00:00:00.000Z"


def test_iso_time_across_seconds_and_within_one() -> None:
    chooser = random.Random(12)
    # Random moments up to the year 2109, each followed by neighbours in the same
    # second and across its boundaries (the formatted second is reused within one).
    for _ in range(2000):
        base = chooser.randrange(0, 2**42)
        for ms in (base, base + 1, base - base % 1000, base - base % 1000 + 999, base + 1000):
            assert iso_time(ms) == expected(ms), ms
            assert iso_time(str(ms)) == expected(ms), ms
