"""Pages of hashes listed by sorted-set indexes: one index, or one per partition merged.

A page never costs more with more rows: nothing loads a whole collection.

* One index (a customer's own orders): ZCARD and ZRANGE by rank, O(log N + page),
  in one round trip, then the page's hashes in a second.
* One index per partition (the phones, all orders), merged into one list ordered by
  score. Every score is a ``seq`` (app/keys.py): microseconds, strictly growing within
  a partition, so scores of different partitions compare as times; a tie across
  partitions is broken by the partition's place in the list. Page ``N`` of ``k`` rows
  starts at offset ``o = (N-1)·k``:

  - **Near the head** (``o + k <= HEAD_LIMIT``): every partition's first
    ``c = ceil((o+k)/m) + 2`` rows come in the round trip that counts them (m indexes).
    The ``o+k``-th best of those bounds the page: a partition whose ``c``-th row is
    still better than that bound may hold more of the page, and only those are read
    further, up to the bound (rarely: it takes 3 of the page's rows in one partition).
    2 round trips, 3 at times; about ``m·c`` rows read, whatever the data size.
  - **Deeper**: the score of the row at offset ``o`` is found by bisecting on scores,
    each probe one round trip of ``m`` ZCOUNTs (O(log N) each): about log2 of the
    span of scores in microseconds, 37 probes for a day of data, 45 for a year, and
    never more than 53; then the page is read from that score on as near the head.
    Independent of the number of rows, and far costlier than one ZRANGE: the price of
    page numbers over partitions (docs/data-tier.md, section 2.4).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from app.query import Page
from app.redis_gateway import RedisGateway

# Above this offset + page size, a page is found by bisection instead of from the heads.
HEAD_LIMIT = 512

# A row as the merge sorts it: (score, the index's place in the list, member), both
# numbers negated for newest first, so plain tuple order is the merge's order.
Row = tuple[int, int, bytes]


async def page_of_hashes(
    gateway: RedisGateway,
    index: str,
    page: Page,
    hash_key: Callable[[str], str],
    *,
    newest_first: bool,
    id_field: str | None = None,
) -> tuple[int, list[dict[str, str]]]:
    start = (page.page - 1) * page.per_page
    stop = start + page.per_page - 1
    total, ids = await gateway.execute_many(
        [("ZCARD", index), ("ZREVRANGE" if newest_first else "ZRANGE", index, start, stop)]
    )
    if not ids:
        return total, []
    return total, await rows_of(gateway, ids, hash_key, id_field)


async def merged_page_of_hashes(
    gateway: RedisGateway,
    indexes: list[str],
    page: Page,
    hash_key: Callable[[str], str],
    *,
    newest_first: bool,
    id_field: str | None = None,
) -> tuple[int, list[dict[str, str]]]:
    """Page ``page`` of the rows of all ``indexes`` merged by score, and their total."""
    total, members = await merged_page(
        gateway,
        indexes,
        (page.page - 1) * page.per_page,
        page.per_page,
        newest_first=newest_first,
    )
    if not members:
        return total, []
    return total, await rows_of(gateway, members, hash_key, id_field)


async def rows_of(
    gateway: RedisGateway,
    members: list[bytes],
    hash_key: Callable[[str], str],
    id_field: str | None,
) -> list[dict[str, str]]:
    """The members' hashes, those that exist; with ``id_field``, each with its member
    under that name (for hashes that do not store their own id: the key holds it)."""
    ids = [member.decode() for member in members]
    rows = await gateway.hgetall_many([hash_key(member) for member in ids])
    if id_field is None:
        return [row for row in rows if row]
    return [{**row, id_field: member} for member, row in zip(ids, rows, strict=True) if row]


def scored(reply: list[Any]) -> list[tuple[bytes, int]]:
    """A WITHSCORES reply as (member, score) pairs: flat in RESP2, pairs in RESP3. Scores
    are seqs, integers (app/keys.py)."""
    if reply and isinstance(reply[0], list):
        return [(member, int(score)) for member, score in reply]
    flat = iter(reply)
    return [(member, int(score)) for member, score in zip(flat, flat, strict=True)]


class Direction:
    """The Redis ranges of one direction of the merge: ascending or newest first."""

    def __init__(self, newest_first: bool) -> None:
        self.newest_first = newest_first
        self.sign = -1 if newest_first else 1

    def rows(self, reply: list[Any], position: int) -> list[Row]:
        """A WITHSCORES reply as rows."""
        sign = self.sign
        return [(sign * score, sign * position, member) for member, score in scored(reply)]

    def score(self, row: Row) -> int:
        return self.sign * row[0]

    def read(self, index: str, start: str, end: str, count: int) -> tuple[Any, ...]:
        """Up to ``count`` rows from ``start`` to ``end`` (Redis score bounds), in order."""
        command = "ZREVRANGEBYSCORE" if self.newest_first else "ZRANGEBYSCORE"
        return (command, index, start, end, "LIMIT", 0, count, "WITHSCORES")

    def everything_from(self, score: int | None) -> tuple[str, str]:
        """The bounds from ``score`` (inclusive; None: the very first) to the end."""
        start = ("+inf" if self.newest_first else "-inf") if score is None else str(score)
        return start, ("-inf" if self.newest_first else "+inf")

    def count_before(self, index: str, score: int) -> tuple[Any, ...]:
        """ZCOUNT of the rows that come before ``score`` (exclusive)."""
        if self.newest_first:
            return ("ZCOUNT", index, f"({score}", "+inf")
        return ("ZCOUNT", index, "-inf", f"({score}")


class IndexLists:
    """Lists that are each one sorted set: every read is one round trip."""

    def __init__(self, indexes: list[str]) -> None:
        self.indexes = indexes
        self.size = len(indexes)
        self._live: list[str] = []

    async def head(
        self, gateway: RedisGateway, order: Direction, count: int
    ) -> tuple[int, list[list[Row]]]:
        """The total of all lists and each one's first ``count`` rows, in one round trip."""
        start, end = order.everything_from(None)
        indexes = self.indexes
        replies = await gateway.execute_many(
            [("ZCARD", index) for index in indexes]
            + [order.read(index, start, end, count) for index in indexes]
        )
        firsts = [order.rows(reply, i) for i, reply in enumerate(replies[len(indexes) :])]
        return sum(replies[: len(indexes)]), firsts

    async def read(
        self, gateway: RedisGateway, order: Direction, wanted: list[tuple[int, str, str, int]]
    ) -> list[list[Row]]:
        """For each (list, start, end, count): up to ``count`` of its rows from ``start``
        to ``end`` (Redis score bounds), in order."""
        replies = await gateway.execute_many(
            [order.read(self.indexes[i], start, end, count) for i, start, end, count in wanted]
        )
        return [order.rows(reply, i) for (i, *_), reply in zip(wanted, replies, strict=True)]

    async def total(self, gateway: RedisGateway) -> int:
        cards = await gateway.execute_many([("ZCARD", index) for index in self.indexes])
        self._live = [index for index, card in zip(self.indexes, cards, strict=True) if card]
        return sum(cards)

    async def score_range(self, gateway: RedisGateway, order: Direction) -> tuple[int, int]:
        """Scores no row is below, and none above (after ``total``, which found rows)."""
        live = self._live
        ends = await gateway.execute_many(
            [("ZRANGE", index, 0, 0, "WITHSCORES") for index in live]
            + [("ZRANGE", index, -1, -1, "WITHSCORES") for index in live]
        )
        scores = [order.score(order.rows(reply, 0)[0]) for reply in ends]
        return min(scores), max(scores)

    async def count_before(self, gateway: RedisGateway, order: Direction, score: int) -> int:
        """How many rows come before ``score`` (exclusive) in the merge's order."""
        counts = await gateway.execute_many(
            [order.count_before(index, score) for index in self._live]
        )
        return sum(counts)


class Lists(Protocol):
    """What the merge needs of its lists (IndexLists; app/status_lists.py's chunked ones)."""

    size: int

    async def head(
        self, gateway: RedisGateway, order: Direction, count: int
    ) -> tuple[int, list[list[Row]]]: ...

    async def read(
        self, gateway: RedisGateway, order: Direction, wanted: list[tuple[int, str, str, int]]
    ) -> list[list[Row]]: ...

    async def total(self, gateway: RedisGateway) -> int: ...

    async def score_range(self, gateway: RedisGateway, order: Direction) -> tuple[int, int]: ...

    async def count_before(self, gateway: RedisGateway, order: Direction, score: int) -> int: ...


async def merged_page(
    gateway: RedisGateway, indexes: list[str], offset: int, count: int, *, newest_first: bool
) -> tuple[int, list[bytes]]:
    """The total of all indexes and the members at ``offset`` .. ``offset+count-1`` of
    their merge."""
    return await merged_lists_page(
        gateway, IndexLists(indexes), offset, count, newest_first=newest_first
    )


async def merged_lists_page(
    gateway: RedisGateway, lists: Lists, offset: int, count: int, *, newest_first: bool
) -> tuple[int, list[bytes]]:
    """The total of all ``lists`` and the members at ``offset`` .. ``offset+count-1`` of
    their merge."""
    order = Direction(newest_first)
    want = offset + count
    if want <= HEAD_LIMIT:
        head = math.ceil(want / lists.size) + 2
        total, firsts = await lists.head(gateway, order, head)
        rows = await _complete(gateway, order, lists, firsts, head, want)
        return total, [member for _, _, member in rows[offset:want]]

    total = await lists.total(gateway)
    if offset >= total:
        return total, []
    score, skip = await _score_at(gateway, order, lists, offset)
    want = skip + count
    head = math.ceil(want / lists.size) + 2
    start, end = order.everything_from(score)
    firsts = await lists.read(gateway, order, [(i, start, end, head) for i in range(lists.size)])
    rows = await _complete(gateway, order, lists, firsts, head, want)
    return total, [member for _, _, member in rows[skip:want]]


async def _complete(
    gateway: RedisGateway,
    order: Direction,
    lists: Lists,
    firsts: list[list[Row]],
    head: int,
    want: int,
) -> list[Row]:
    """The first ``want`` rows of the merge, given each list's first ``head`` rows
    (from the same start): reads further only the lists that may hold more of them."""
    rows = sorted(row for first in firsts for row in first)
    bound = rows[want - 1] if len(rows) >= want else None
    very_end = order.everything_from(None)[1]
    more = []
    for i, first in enumerate(firsts):
        if len(first) < head:
            continue  # the list ran out: all of it is here
        last = first[-1]
        if bound is not None and last >= bound:
            continue  # its next rows all come after the bound
        # Scores are unique within a list, so "after its last row" is by score.
        end = very_end if bound is None else str(order.score(bound))
        more.append((i, f"({order.score(last)}", end, want))
    if not more:
        return rows[:want]
    for further in await lists.read(gateway, order, more):
        rows.extend(further)
    rows.sort()
    return rows[:want]


async def _score_at(
    gateway: RedisGateway, order: Direction, lists: Lists, offset: int
) -> tuple[int, int]:
    """The score of the row at ``offset`` of the merge, and how many rows of that very
    score come before it: bisection on scores, one count of every list per probe."""
    low, high = await lists.score_range(gateway, order)

    async def before(score: int) -> int:
        return await lists.count_before(gateway, order, score)

    # The row at `offset` has the last score (in the merge's order) with before() <= offset:
    # ascending, the greatest such score; newest first, the least.
    while low < high:
        if order.newest_first:
            middle = (low + high) // 2
            if await before(middle) <= offset:
                high = middle
            else:
                low = middle + 1
        else:
            middle = (low + high + 1) // 2
            if await before(middle) <= offset:
                low = middle
            else:
                high = middle - 1
    return low, offset - await before(low)
