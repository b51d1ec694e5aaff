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
read is then one round trip: the 128 clocks and the page's hashes together (the
gateway's ``read_strings_with``: one MGET on one redis-server, one script per primary on
the cluster). The rows themselves are never remembered (stock moves with every order):
they come from Redis in that same round trip. If any clock moved, the rows read with it are dropped and the
page is merged again, as without this cache, from clocks read before the merge; a page
merged while a phone was being created is tagged with the older clocks and so is merged
again at its next read.

Never a stale page: a create that finished before a read began moved its clock before
that read's clock reads, whatever worker served either.

A striped phone's shown stock adds its stripes' (docs/escrow.md, section 7): its caller
(app/phones/service.py: list_phones) reads them for the page's striped rows in one more
round trip; a page without one costs what it did, and no stripe figure is remembered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app import keys
from app.paging import merged_page
from app.partitions import PARTITIONS
from app.query import Page
from app.redis_gateway import RedisGateway, decode_hash

# Pages remembered per worker: (offset, size) pairs clients ask for. Past this many the
# whole memory is dropped (every entry is re-merged once): a bound on the worker's
# memory against clients walking every page of a large catalogue.
MAX_PAGES = 1024

INDEXES = tuple(keys.phones(p) for p in range(PARTITIONS))
CLOCKS = tuple(keys.phones_seq(p) for p in range(PARTITIONS))

Clocks = list[bytes | None]


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

    async def page(self, gateway: RedisGateway, page: Page) -> tuple[int, list[dict[str, str]]]:
        """The total and the rows of ``page``, as merged_page_of_hashes answers them."""
        offset, size = (page.page - 1) * page.per_page, page.per_page
        remembered = self._pages.get((offset, size))
        if remembered is None:
            clocks, _ = await gateway.read_strings_with(CLOCKS, [])
        else:
            rows = [("HGETALL", keys.phone(member.decode())) for member in remembered.members]
            clocks, replies = await gateway.read_strings_with(CLOCKS, rows)
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
