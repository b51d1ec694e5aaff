"""The catalogue's pages, remembered by each worker while the catalogue's clocks stand still.

A page of ``GET /phones`` is a slice of the 128 partitions' indexes merged (app/paging.py):
2 or 3 round trips of 256 commands and about 0.6 ms of the worker's CPU. The catalogue is
small and changes rarely while it is read all the time, so each worker keeps the ids of
the pages it served, with the partitions' clocks (``pq{Q}``, app/keys.py) read before
the merge that found them.

Only ``create_phone.lua`` changes an index (no script deletes a phone), and it moves its
partition's clock in the same step (``next_seq``); a bulk loader that writes the indexes
itself must move the clocks too (loadtests/bench_data.py sets them after its rows). So a
remembered page is still the merge's slice while every clock reads as it did, and a page
read is then one round trip: the 128 clocks and the page's hashes together (the clocks
by one MGET on one redis-server, by one read_clocks.lua per primary on the cluster). The
rows themselves are never remembered (stock moves with every order): they come from Redis
in that same round trip. If any clock moved, the rows read with it are dropped and the
page is merged again, as without this cache, from clocks read before the merge; a page
merged while a phone was being created is tagged with the older clocks and so is merged
again at its next read.

Never a stale page: a create that finished before a read began moved its clock before
that read's clock reads, whatever worker served either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisClusterException, ResponseError

from app import keys
from app.cluster_gateway import ClusterGateway
from app.paging import merged_page
from app.partitions import PARTITIONS
from app.query import Page
from app.redis_gateway import LuaScript, RedisGateway, decode_hash
from app.scripts import load_source

# Pages remembered per worker: (offset, size) pairs clients ask for. Past this many the
# whole memory is dropped (every entry is re-merged once): a bound on the worker's
# memory against clients walking every page of a large catalogue.
MAX_PAGES = 1024

INDEXES = tuple(keys.phones(p) for p in range(PARTITIONS))
CLOCKS = tuple(keys.phones_seq(p) for p in range(PARTITIONS))

Clocks = tuple[bytes | None, ...]

# On the cluster: one call per primary reads its partitions' clocks (app/lua/read_clocks.lua).
READ_CLOCKS = LuaScript.of("read_clocks", load_source("read_clocks"))


@dataclass(frozen=True, slots=True)
class _Remembered:
    clocks: Clocks
    total: int
    members: list[bytes]


@dataclass
class CataloguePages:
    """This worker's remembered pages of the catalogue, oldest phone first."""

    max_pages: int = MAX_PAGES
    _pages: dict[tuple[int, int], _Remembered] = field(default_factory=dict, repr=False)
    # Counters for the tests and the bench: pages answered from memory, and merged.
    hits: int = 0
    merges: int = 0
    # On the cluster: the clocks' positions grouped by the primary serving them, each
    # group read by one READ_CLOCKS call; None until known, and again after a failed read
    # (a moved slot, a node without the script), when one GET per clock is the fallback.
    _clock_groups: list[list[int]] | None = field(default=None, repr=False)

    async def page(self, gateway: RedisGateway, page: Page) -> tuple[int, list[dict[str, str]]]:
        """The total and the rows of ``page``, as merged_page_of_hashes answers them."""
        offset, size = (page.page - 1) * page.per_page, page.per_page
        remembered = self._pages.get((offset, size))
        if remembered is None:
            clocks, _ = await self._read(gateway, [])
        else:
            rows = [("HGETALL", keys.phone(member.decode())) for member in remembered.members]
            clocks, replies = await self._read(gateway, rows)
            if clocks == remembered.clocks:
                self.hits += 1
                hashes = (decode_hash(reply) for reply in replies)
                return remembered.total, [row for row in hashes if row]
        self.merges += 1
        total, members = await merged_page(gateway, list(INDEXES), offset, size, newest_first=False)
        if len(self._pages) >= self.max_pages:
            self._pages.clear()
        self._pages[(offset, size)] = _Remembered(clocks, total, members)
        if not members:
            return total, []
        rows = await gateway.hgetall_many([keys.phone(member.decode()) for member in members])
        return total, [row for row in rows if row]

    async def _read(
        self, gateway: RedisGateway, commands: list[tuple[Any, ...]]
    ) -> tuple[Clocks, list[Any]]:
        """The 128 clocks, and the replies of ``commands``, in one round trip: one MGET on
        one redis-server; on the cluster, where the clocks are in 128 slots, one
        READ_CLOCKS per primary (a GET each costs redis-py's cluster pipeline about
        20 µs of CPU: 2.6 ms per page)."""
        if gateway.one_node:
            replies = await gateway.execute_many([("MGET", *CLOCKS), *commands])
            return tuple(replies[0]), replies[1:]
        assert isinstance(gateway, ClusterGateway)
        groups = self._clock_groups
        if groups is not None:
            reads = [
                ("EVALSHA", READ_CLOCKS.sha, 1, *(CLOCKS[p] for p in group)) for group in groups
            ]
            try:
                replies = await gateway.execute_many([*reads, *commands])
            except (ResponseError, RedisClusterException):
                # NOSCRIPT (a node that never loaded it, a failover) or a clock its node no
                # longer serves (a reshard): nothing was written; read them one by one.
                self._clock_groups = None
            else:
                clocks: list[bytes | None] = [None] * PARTITIONS
                for group, values in zip(groups, replies[: len(groups)], strict=True):
                    for partition, value in zip(group, values, strict=True):
                        clocks[partition] = value
                return tuple(clocks), replies[len(groups) :]
        replies = await gateway.execute_many([("GET", clock) for clock in CLOCKS] + commands)
        # For the next read: the map as the library knows it now, and the script on every
        # primary (SCRIPT LOAD reaches each).
        self._clock_groups = gateway.by_primary(list(CLOCKS))
        if self._clock_groups is not None:
            await gateway.execute("SCRIPT", "LOAD", READ_CLOCKS.source)
        return tuple(replies[:PARTITIONS]), replies[PARTITIONS:]
