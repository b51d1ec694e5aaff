-- restock: add units to a phone's stock, and to the units ever added that
-- the audit balances against; the ledger's totals move with them.
--
-- KEYS[1]  p{Q}<phone_id>  hash, must exist (key names: app/keys.py)
-- KEYS[2]  lg{Q}           hash, the running totals of its partition
-- ARGV[1]  quantity (1..10^9, checked by the caller)
-- ARGV[2]  stock ceiling: the restock is refused when stock + held (units reserved by
--          the saga, which an abort gives back) + lent (units granted to stripes, which
--          a recall ships home: docs/escrow.md, section 6) would pass it. lent includes
--          units the stripes sold, so it is conservative until the next recall
--
-- A restock ends a recall's `drained` mark: deep again, the phone may be striped again
-- (docs/escrow.md, section 5). During a recall (mode draining) it leaves `restocked`, so
-- that the recall's end (end_recall) does not mark the phone drained after it.
--
-- Returns {http_status, payload_json}:
--   200, phone fields (strings)
--   404, {code="phone_not_found"}                      nothing written
--   409, {code="stock_limit", stock, limit}            nothing written
--
-- hgetall_map, PHONE_MODE: the prelude (app/lua_prelude.py).

local row = redis.call('HMGET', KEYS[1], 'stock', 'held', 'lent', 'mode')
local stock = row[1]
if not stock then
  return {404, cjson.encode({code = 'phone_not_found'})}
end
-- Units held by the reservation saga come back to stock if their order aborts, and
-- units lent to stripes come back with a recall, so both count against the ceiling.
local counted = tonumber(stock) + tonumber(row[2] or '0') + tonumber(row[3] or '0')
if counted + tonumber(ARGV[1]) > tonumber(ARGV[2]) then
  return {409, cjson.encode({code = 'stock_limit', stock = stock, limit = ARGV[2]})}
end
redis.call('HINCRBY', KEYS[1], 'stock', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'added_units', ARGV[1])
redis.call('HDEL', KEYS[1], 'drained')
if row[4] == PHONE_MODE.draining then
  redis.call('HSET', KEYS[1], 'restocked', 1)
end
redis.call('HINCRBY', KEYS[2], 'stock_units', ARGV[1])
redis.call('HINCRBY', KEYS[2], 'added_units', ARGV[1])
redis.call('HINCRBY', KEYS[2], 'changes', 1)
return {200, cjson.encode(hgetall_map(KEYS[1]))}
