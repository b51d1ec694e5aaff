"""Rebuild the ledgers (``keys.ledger(P)``, one per partition) of a database written
before they existed.

    python -m app.admin.ledger_rebuild          # REDIS_URL as the app reads it

Run it at rest: stop every app instance first. The rows are recounted in
pages (the audit's own recount, app/admin/audit.py, partition by partition),
which is not one moment of the shop while scripts write. A script of this
version that runs meanwhile moves a ledger's ``changes``: the rebuild then
writes nothing and says so (it compares every partition's ``changes`` before
writing any, and app/lua/rebuild_ledger.lua checks its own partition's again
as it writes); a writer that predates the ledger moves
nothing it could see, hence "stop every writer". Why not at start-up or in
one script: a single script summing a million rows would hold Redis for
seconds, and an instance starting up cannot know that no other instance (an
older one included) is writing.

Rows that cannot be summed (an unknown status, an index entry without its
row) stop the rebuild: a ledger built over them would hide them from the audit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from app import keys
from app.admin.audit import LEDGER_FIELDS, read_start, recount_rows
from app.partitions import PARTITIONS
from app.scripts import load_source
from app.settings import Settings, SettingsError, redis_url_from_env

FIGURES = tuple(name for name in LEDGER_FIELDS if name != "changes")


class LedgerRebuildError(RuntimeError):
    """The ledger was left as it was; the message says why."""


@dataclass(frozen=True)
class LedgerRecount:
    changes: dict[int, int]  # partition -> its ledger's `changes` when the recount began
    figures: dict[int, dict[str, int]]  # partition -> its figures; only partitions with rows

    @property
    def totals(self) -> dict[str, int]:
        return {name: sum(f[name] for f in self.figures.values()) for name in FIGURES}


async def recount_ledger(redis: Redis) -> LedgerRecount:
    """Every partition's ledger figures summed from its rows, and the `changes` it starts from."""
    start = await read_start(redis)
    found = await recount_rows(redis, start.last)
    if found.dangling or found.bad_rows:
        raise LedgerRebuildError(
            "rows the ledger cannot sum; fix them first (GET /admin/audit lists them): "
            + json.dumps({"dangling": found.dangling, "bad_rows": found.bad_rows[:20]})
        )
    figures = {
        p: {name: found.partitions[p][name] for name in FIGURES}
        for p in range(PARTITIONS)
        if any(found.partitions[p].values()) or start.present[p]
    }
    return LedgerRecount({p: start.ledgers[p]["changes"] for p in range(PARTITIONS)}, figures)


async def write_ledger(redis: Redis, recount: LedgerRecount) -> int:
    """Write every partition's recount unless a script ran since it began; the sum of
    the new `changes`."""
    async with redis.pipeline(transaction=False) as pipe:
        for p in range(PARTITIONS):
            pipe.hget(keys.ledger(p), "changes")
        now = [int(value or 0) for value in await pipe.execute()]
    moved = sum(now) - sum(recount.changes.values())
    if moved:
        raise LedgerRebuildError(
            f"{moved} script run(s) wrote while the rows were "
            "recounted: nothing written. Stop every app instance and run it again."
        )
    script = redis.register_script(load_source("rebuild_ledger"))
    total = 0
    for p, figures in recount.figures.items():
        pairs = [item for name, value in figures.items() for item in (name, value)]
        written, changes = await script(keys=[keys.ledger(p)], args=[recount.changes[p], *pairs])
        if not written:
            raise LedgerRebuildError(
                f"{int(changes) - recount.changes[p]} script run(s) wrote in partition {p} "
                "while the ledgers were written: run it again once every app instance stopped."
            )
        total += int(changes)
    return total


async def rebuild_ledger(redis: Redis) -> dict[str, Any]:
    recount = await recount_ledger(redis)
    changes = await write_ledger(redis, recount)
    return {
        "rebuilt": True,
        "partitions": len(recount.figures),
        "ledger": {**recount.totals, "changes": changes},
    }


async def _main(redis_url: str) -> int:
    redis = Redis.from_url(redis_url)
    try:
        answer = await rebuild_ledger(redis)
    except LedgerRebuildError as error:
        print(f"ledger_rebuild: {error}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()
    print(json.dumps(answer, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    try:
        redis_url = redis_url_from_env(os.environ, Settings.redis_url)
    except SettingsError as error:
        print(f"ledger_rebuild: {error}", file=sys.stderr)
        return 2
    return asyncio.run(_main(redis_url))


if __name__ == "__main__":
    sys.exit(main())
