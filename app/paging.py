"""One page of hashes listed by a sorted-set index, in two round trips.

ZRANGE by rank costs O(log N + page), so a page costs the same with a thousand
or a million rows; nothing ever loads a whole collection.
"""

from __future__ import annotations

from collections.abc import Callable

from redis.asyncio import Redis

from app.fastredis import MultiplexedRedis
from app.models import Page


def decoded_hash(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def _pairs(flat: list[bytes]) -> dict[str, str]:
    """HGETALL's raw reply (field, value, field, value, ...) decoded, as decoded_hash."""
    return {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}


async def page_of_hashes(
    redis: Redis,
    index: str,
    page: Page,
    hash_key: Callable[[str], str],
    *,
    newest_first: bool,
    fast: MultiplexedRedis | None = None,
) -> tuple[int, list[dict[str, str]]]:
    start = (page.page - 1) * page.per_page
    stop = start + page.per_page - 1
    if fast is not None:
        # The same two round trips over the multiplexed connection (app/fastredis.py).
        total, ids = await fast.execute_many(
            [("ZCARD", index), ("ZREVRANGE" if newest_first else "ZRANGE", index, start, stop)]
        )
        if not ids:
            return total, []
        flat_rows = await fast.execute_many([("HGETALL", hash_key(m.decode())) for m in ids])
        return total, [_pairs(row) for row in flat_rows if row]
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
