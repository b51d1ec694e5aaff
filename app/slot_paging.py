"""Pages of a few sorted-set indexes of one slot merged by score, newest first, in one
round trip at any depth: app/lua/slot_page.lua finds the page server-side.

A customer's orders without a status filter are the merge of its status indexes
(layout 5 keeps no index of all of them), all in its partition, so one slot: one
EVALSHA, on one redis-server and on the cluster alike. app/paging.py's merge over
partitions needs a round trip per bisection probe past its head instead (about 23 for
a customer's page past offset 512); its keys span every node, so it stays there.
"""

from __future__ import annotations

from collections.abc import Callable

from app.query import Page
from app.redis_gateway import LuaScript, RedisGateway
from app.scripts import load_source

SLOT_PAGE = LuaScript.of("slot_page", load_source("slot_page"))


async def slot_merged_page(
    gateway: RedisGateway, indexes: list[str], offset: int, count: int
) -> tuple[int, list[bytes]]:
    """The total of ``indexes`` (all of one slot) and the members at ``offset`` ..
    ``offset+count-1`` of their merge, newest first."""
    total, members = await gateway.run_read_script(SLOT_PAGE, indexes, [offset, count])
    return int(total), list(members)


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
