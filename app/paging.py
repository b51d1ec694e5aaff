"""One page of hashes listed by a sorted-set index, in two round trips.

ZRANGE by rank costs O(log N + page), so a page costs the same with a thousand
or a million rows; nothing ever loads a whole collection.
"""

from __future__ import annotations

from collections.abc import Callable

from app.query import Page
from app.redis_gateway import RedisGateway


async def page_of_hashes(
    gateway: RedisGateway,
    index: str,
    page: Page,
    hash_key: Callable[[str], str],
    *,
    newest_first: bool,
) -> tuple[int, list[dict[str, str]]]:
    start = (page.page - 1) * page.per_page
    stop = start + page.per_page - 1
    total, ids = await gateway.execute_many(
        [("ZCARD", index), ("ZREVRANGE" if newest_first else "ZRANGE", index, start, stop)]
    )
    if not ids:
        return total, []
    rows = await gateway.hgetall_many([hash_key(member.decode()) for member in ids])
    return total, [row for row in rows if row]
