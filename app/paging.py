"""One page of hashes listed by a sorted-set index, in two round trips.

ZRANGE by rank costs O(log N + page), so a page costs the same with a thousand
or a million rows; nothing ever loads a whole collection.
"""

from __future__ import annotations

from collections.abc import Callable

from redis.asyncio import Redis

from app.models import Page


def decoded_hash(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


async def page_of_hashes(
    redis: Redis,
    index: str,
    page: Page,
    hash_key: Callable[[str], str],
    *,
    newest_first: bool,
) -> tuple[int, list[dict[str, str]]]:
    start = (page.page - 1) * page.per_page
    stop = start + page.per_page - 1
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(index)
        if newest_first:
            pipe.zrevrange(index, start, stop)
        else:
            pipe.zrange(index, start, stop)
        total, ids = await pipe.execute()
    if not ids:
        return total, []
    async with redis.pipeline(transaction=False) as pipe:
        for member in ids:
            pipe.hgetall(hash_key(member.decode()))
        rows = await pipe.execute()
    return total, [decoded_hash(row) for row in rows if row]
