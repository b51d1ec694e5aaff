"""A partition's orders of one status as one list, read through its chunks.

Orders are indexed by status in chunks of at most CHUNK_ORDERS (app/keys.py,
docs/data-tier.md 10.2): ``os{P}<status>:<k>``, with the directory ``od{P}<status>`` of
the non-empty ones scored by their start (the seq of the first order placed in the
chunk) and their counts ``on{P}<status>``. A chunk's seqs all precede the next one's, so
the list is its chunks concatenated, newest chunk first. ``StatusLists`` gives
app/paging.py's merge what it needs of such lists, newest first, with round trips that
do not grow with the data:

* rows from a seq on: the directory's chunks starting at or before it (one round trip),
  then those chunks' rows (a second). ``c`` rows need at most ``c + 1`` chunks: every
  chunk after the first holds at least one row past the seq;
* the total: the ledger's ``orders_<status>`` (moved by the same scripts);
* the count of rows newer than a seq (the deep pages' bisection): the directory's chunk
  holding it (one round trip), then count_newer.lua per partition over the chunk
  counts, at most CHUNK_GROUP fields a list (a second).
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import NoScriptError

from app import keys
from app.paging import Direction, Row
from app.redis_gateway import LuaScript, RedisGateway
from app.scripts import load_source

COUNT_NEWER = LuaScript.of("count_newer", load_source("count_newer"))


def _seq(bound: str) -> str:
    """A Redis score bound's number, inclusive: the chunk holding a seq starts at or
    before it, whether the bound takes the seq itself or not."""
    return bound.removeprefix("(")


class StatusLists:
    """The status lists of some (partition, status) pairs, merged by app/paging.py."""

    def __init__(self, lists: list[tuple[int, str]]) -> None:
        self.lists = lists
        self.size = len(lists)
        self._totals: list[int] = []
        self._newest_chunk: list[int | None] = []

    def _check(self, order: Direction) -> None:
        if not order.newest_first:
            raise ValueError("status lists are read newest first")

    async def head(
        self, gateway: RedisGateway, order: Direction, count: int
    ) -> tuple[int, list[list[Row]]]:
        self._check(order)
        totals = self._total_commands()
        replies = await gateway.execute_many(
            totals + [("ZREVRANGE", keys.order_chunks(p, s), 0, count - 1) for p, s in self.lists]
        )
        total = sum(int(value or 0) for reply in replies[: len(totals)] for value in reply)
        # Every chunk in the directory holds a row: `count` chunks hold `count` rows.
        chunks = [[int(k) for k in reply] for reply in replies[len(totals) :]]
        reads = [
            ("ZREVRANGE", keys.orders_by_status(*self.lists[i], k), 0, count - 1 - t, "WITHSCORES")
            for i, ks in enumerate(chunks)
            for t, k in enumerate(ks)
        ]
        return total, self._gather(order, chunks, await gateway.execute_many(reads), count)

    async def read(
        self, gateway: RedisGateway, order: Direction, wanted: list[tuple[int, str, str, int]]
    ) -> list[list[Row]]:
        self._check(order)
        directories = await gateway.execute_many(
            [
                (
                    "ZREVRANGEBYSCORE",
                    keys.order_chunks(*self.lists[i]),
                    _seq(start),
                    "-inf",
                    "LIMIT",
                    0,
                    count + 1,
                )
                for i, start, _, count in wanted
            ]
        )
        chunks = [[int(k) for k in reply] for reply in directories]
        reads = []
        for (i, start, end, count), ks in zip(wanted, chunks, strict=True):
            for t, k in enumerate(ks):
                # The first chunk may hold none past the seq; each later one holds some.
                limit = count - max(t - 1, 0)
                reads.append(
                    order.read(keys.orders_by_status(*self.lists[i], k), start, end, limit)
                )
        replies = await gateway.execute_many(reads)
        found = self._gather(order, chunks, replies, None, [w[0] for w in wanted])
        return [rows[:count] for rows, (_, _, _, count) in zip(found, wanted, strict=True)]

    def _gather(
        self,
        order: Direction,
        chunks: list[list[int]],
        replies: list[Any],
        count: int | None,
        positions: list[int] | None = None,
    ) -> list[list[Row]]:
        """Each list's rows from its chunks' replies (in the directory's order, which is
        the list's), cut to ``count``."""
        found, at = [], 0
        for n, ks in enumerate(chunks):
            position = n if positions is None else positions[n]
            rows: list[Row] = []
            for reply in replies[at : at + len(ks)]:
                rows.extend(order.rows(reply, position))
            at += len(ks)
            found.append(rows if count is None else rows[:count])
        return found

    def _by_partition(self) -> dict[int, list[int]]:
        by_partition: dict[int, list[int]] = {}
        for i, (p, _) in enumerate(self.lists):
            by_partition.setdefault(p, []).append(i)
        return by_partition

    def _total_commands(self) -> list[tuple[Any, ...]]:
        """One HMGET of each partition's ledger: its lists' order counts."""
        return [
            ("HMGET", keys.ledger(p), *(f"orders_{self.lists[i][1]}" for i in positions))
            for p, positions in self._by_partition().items()
        ]

    async def total(self, gateway: RedisGateway) -> int:
        replies = await gateway.execute_many(self._total_commands())
        self._totals = [0] * self.size
        for positions, reply in zip(self._by_partition().values(), replies, strict=True):
            for i, value in zip(positions, reply, strict=True):
                self._totals[i] = int(value or 0)
        return sum(self._totals)

    async def score_range(self, gateway: RedisGateway, order: Direction) -> tuple[int, int]:
        """No row is older than its list's oldest chunk's start, nor newer than its
        partition's seq clock; and each list's newest chunk, for count_before."""
        self._check(order)
        partitions = sorted({p for p, _ in self.lists})
        replies = await gateway.execute_many(
            [("ZRANGE", keys.order_chunks(p, s), 0, 0, "WITHSCORES") for p, s in self.lists]
            + [("ZRANGE", keys.order_chunks(p, s), -1, -1) for p, s in self.lists]
            + [("GET", keys.orders_seq(p)) for p in partitions]
        )
        oldest = [order.rows(reply, 0) for reply in replies[: self.size]]
        self._newest_chunk = [
            int(reply[0]) if reply else None for reply in replies[self.size : 2 * self.size]
        ]
        starts = [order.score(rows[0]) for rows in oldest if rows]
        clocks = [keys.order_clock_parts(value)[0] for value in replies[2 * self.size :] if value]
        return min(starts), max(clocks)

    async def count_before(self, gateway: RedisGateway, order: Direction, score: int) -> int:
        """The rows newer than ``score``, over every list."""
        live = [i for i, top in enumerate(self._newest_chunk) if top is not None]
        holders = await gateway.execute_many(
            [
                (
                    "ZREVRANGEBYSCORE",
                    keys.order_chunks(*self.lists[i]),
                    score,
                    "-inf",
                    "LIMIT",
                    0,
                    1,
                )
                for i in live
            ]
        )
        count = 0
        calls: dict[int, tuple[list[str], list[Any]]] = {}
        for i, holder in zip(live, holders, strict=True):
            if not holder:
                count += self._totals[i]  # every chunk starts after the score
                continue
            partition, status = self.lists[i]
            names, args = calls.setdefault(partition, ([], [score]))
            names += [
                keys.order_chunk_counts(partition, status),
                keys.orders_by_status(partition, status, int(holder[0])),
            ]
            args += [int(holder[0]), self._newest_chunk[i]]
        commands = [
            ("EVALSHA", COUNT_NEWER.sha, len(names), *names, *args)
            for names, args in calls.values()
        ]
        if not commands:
            return count
        try:
            replies = await gateway.execute_many(commands)
        except NoScriptError:
            await gateway.execute("SCRIPT", "LOAD", COUNT_NEWER.source)  # every primary
            replies = await gateway.execute_many(commands)
        return count + sum(n for reply in replies for n in reply)
