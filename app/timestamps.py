"""Times as the API writes them: ISO 8601 in UTC, to the millisecond."""

from __future__ import annotations

import datetime as dt


def iso_time(ms: str | int) -> str:
    moment = dt.datetime.fromtimestamp(int(ms) / 1000, tz=dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
