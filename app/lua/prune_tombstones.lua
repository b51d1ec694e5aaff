#!lua
-- prune_tombstones: drop one partition X's abort markers (ab{X}, the saga's fence) and
-- release tombstones (rx{X}) whose keep-until time has passed (docs/data-tier.md, 3.2).
-- Each was written with a keep-until past the latest expiry its order's steps can carry
-- (app/orders/saga.py: keep_until); reserve_stock and commit_order refuse a step past its
-- expiry by Redis TIME, so once that time is past no late reserve or commit of the order
-- can run, marker or not. Run by the settler; idempotent: a second run finds nothing due.
--
-- KEYS[1]  ab{X}  hash: order id -> abort marker
-- KEYS[2]  ad{X}  zset: order id by when its marker may go (ms)
-- KEYS[3]  rx{X}  hash: order id -> released
-- KEYS[4]  xd{X}  zset: order id by when its tombstone may go (ms)
-- ARGV[1]  now, ms since the epoch (the settler's clock)
-- ARGV[2]  at most this many of each kind in this call
--
-- Returns {200, payload_json, wrote}:
--   200, {aborts="n", releases="m"}, 1|0   how many of each went; wrote = 1 when any did
--   error reply "prune_tombstones: ..."    bad arguments; nothing written

local now, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if not now or not limit or limit < 1 then
  return redis.error_reply('prune_tombstones: ARGV must be now (ms) and a positive limit')
end

local function prune(hash, due)
  local ids = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, limit)
  if #ids > 0 then
    redis.call('HDEL', hash, unpack(ids))
    redis.call('ZREM', due, unpack(ids))
  end
  return #ids
end

local aborts = prune(KEYS[1], KEYS[2])
local releases = prune(KEYS[3], KEYS[4])
return {200, cjson.encode({aborts = tostring(aborts), releases = tostring(releases)}),
  (aborts + releases > 0) and 1 or 0}
