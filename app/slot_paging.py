"""Pages of a few sorted-set indexes of one slot merged by score, newest first, in one
round trip at any depth: near the head, plain reads of every index's first rows merged
here; deeper, app/lua/slot_page.lua finds the page server-side.

A customer's orders without a status filter are the merge of its status indexes
(layout 5 keeps no index of all of them), all in its partition, so one slot: one
round trip, on one redis-server and on the cluster alike. app/paging.py's merge over
partitions needs a round trip per bisection probe past its head instead (about 23 for
a customer's page past offset 512); its keys span every node, so it stays there.

The head is read without the script because page 1 is the page most often read, and a
script call costs Redis more than a few ZREVRANGEs (about 0.6 of it, measured with 3
indexes and 20 rows): the script would read the very same rows (slot_page.lua merges
the first ``offset + count`` rows of every index below its HEAD_ROWS too).
"""

from __future__ import annotations

from collections.abc import Callable

from app.paging import scored
from app.query import Page
from app.redis_gateway import LuaScript, RedisGateway
from app.scripts import load_source

SLOT_PAGE = LuaScript.of("slot_page", load_source("slot_page"))

# Offsets below this are read with plain reads (slot_page.lua's HEAD_ROWS: below it the
# script, too, merges every index's first offset + count rows instead of probing).
HEAD_ROWS = 32


async def slot_merged_page(
    gateway: RedisGateway, indexes: list[str], offset: int, count: int
) -> tuple[int, list[bytes]]:
    """The total of ``indexes`` (all of one slot) and the members at ``offset`` ..
    ``offset+count-1`` of their merge, newest first."""
    if offset < HEAD_ROWS:
        return await _head_page(gateway, indexes, offset, count)
    total, members = await gateway.run_read_script(SLOT_PAGE, indexes, [offset, count])
    return int(total), list(members)


async def _head_page(
    gateway: RedisGateway, indexes: list[str], offset: int, count: int
) -> tuple[int, list[bytes]]:
    """As slot_page.lua's head: each index's first ``offset + count`` rows and its size
    in one round trip, merged in the script's order, the reverse of ascending (score,
    the index's place, member)."""
    want = offset + count
    replies = await gateway.execute_many(
        [("ZCARD", index) for index in indexes]
        + [("ZREVRANGE", index, 0, want - 1, "WITHSCORES") for index in indexes]
    )
    rows = [
        (score, place, member)
        for place, reply in enumerate(replies[len(indexes) :])
        for member, score in scored(reply)
    ]
    rows.sort(reverse=True)
    return sum(replies[: len(indexes)]), [member for _, _, member in rows[offset:want]]


async def slot_merged_page_of_hashes(
    gateway: RedisGateway,
    indexes: list[str],
    page: Page,
    hash_key: Callable[[str], str],
    *,
    id_field: str,
) -> tuple[int, list[dict[str, str]]]:
    """Page ``page`` of the merge, as the members' hashes (those that exist), each with
    its member under ``id_field`` (the hashes do not store their own id), and the total."""
    total, members = await slot_merged_page(
        gateway, indexes, (page.page - 1) * page.per_page, page.per_page
    )
    if not members:
        return total, []
    ids = [member.decode() for member in members]
    rows = await gateway.hgetall_many([hash_key(member) for member in ids])
    return total, [{**row, id_field: member} for member, row in zip(ids, rows, strict=True) if row]
