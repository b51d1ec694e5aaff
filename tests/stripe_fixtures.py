"""Escrow's stripes for the tests (docs/escrow.md), made through the real receipt
(app/lua/receive_grant.lua, app/orders/stripes.py).

TEST-ONLY: the pool side of a grant (the phone's stock lent, its ledger, its stripe_hosts
set, its mode) is written by ``LEND`` below, because no app script does it yet: the
grant's reserve and its settle held -> lent are build-step 3 (docs/escrow.md, section 11).
It moves what the reserve and the settle move together, in one script on the phone's
partition, so the audit's identities hold as they will with the real grant.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app import keys, partitions
from app.orders import stripes
from app.partitions import partition_of
from app.scripts import ScriptResult, Scripts
from app.vocabulary import STRIPED

# KEYS: p{Q}<phone>, lg{Q}, sh{Q}<phone>; ARGV: units, host, mode.
LEND = """
local k = tonumber(ARGV[1])
local stock = tonumber(redis.call('HGET', KEYS[1], 'stock'))
if stock < k then return redis.error_reply('lend: short') end
redis.call('HINCRBY', KEYS[1], 'stock', -k)
redis.call('HINCRBY', KEYS[1], 'lent', k)
redis.call('HSET', KEYS[1], 'mode', ARGV[3])
redis.call('HINCRBY', KEYS[2], 'stock_units', -k)
redis.call('HINCRBY', KEYS[2], 'lent_units', k)
redis.call('HINCRBY', KEYS[2], 'changes', 1)
redis.call('SADD', KEYS[3], ARGV[2])
return k
"""


async def grant(
    redis: Redis | RedisCluster,
    scripts: Scripts,
    *,
    phone_id: str,
    host: int,
    units: int,
    price_cents: int,
    gen: int = 0,
) -> ScriptResult:
    """``units`` of the phone's pool lent (LEND, test-only) and received on ``host``'s
    stripe by the real receipt, under a new grant id; the receipt's answer."""
    await redis.eval(
        LEND,
        3,
        keys.phone(phone_id),
        keys.ledger(partition_of(phone_id)),
        keys.stripe_hosts(phone_id),
        units,
        host,
        STRIPED,
    )
    return await stripes.receive_grant(
        scripts,
        host=host,
        phone_id=phone_id,
        grant_id=partitions.new_id(host),
        units=units,
        price_cents=price_cents,
        gen=gen,
    )
