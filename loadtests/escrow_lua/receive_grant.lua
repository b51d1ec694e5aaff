-- receive_grant (PROTOTYPE for loadtests/escrow_probe.py, not an app script): a refill's
-- receipt on the stripe host partition S (docs/escrow.md, "Refill"). The grant is a
-- reservation on the phone's partition (reserve_stock.lua with the grant id as its order
-- id); this is its commit point, as commit_order.lua is an order's: refused once the
-- settler's fence aborted the grant, idempotent by grant id, and it adds the units to
-- the stripe at the price of the grant's generation (the newest generation's price wins).
-- Nothing is written before the last check.
--
-- KEYS[1]  sq{S}<phone_id>  the stripe (prototype key)
-- KEYS[2]  lg{S}            the host partition's ledger
-- KEYS[3]  gr{S}            hash: grant id -> received units (the receipts; the fence's test)
-- KEYS[4]  ab{S}            hash: grant id -> abort marker (the settler's fence)
-- ARGV[1]  grant id (minted in S)
-- ARGV[2]  units
-- ARGV[3]  unit price, cents, as the reserve read it
-- ARGV[4]  the phone's price generation the reserve read
--
-- Returns {http_status, payload_json, received}:
--   200, {stock}, 1       received now
--   200, {stock}, 0       received before; nothing written
--   503, {code="service_unavailable"}, 0    the grant was fenced (aborted); nothing written

if #KEYS ~= 4 or #ARGV ~= 4 then
  return redis.error_reply('receive_grant: expected 4 keys and 4 arguments')
end
if redis.call('HEXISTS', KEYS[4], ARGV[1]) == 1 then
  return {503, cjson.encode({code = 'service_unavailable'}), 0}
end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  return {200, cjson.encode({stock = redis.call('HGET', KEYS[1], 'stock')}), 0}
end
local units = tonumber(ARGV[2])
local gen = tonumber(redis.call('HGET', KEYS[1], 'gen') or '-1')
if tonumber(ARGV[4]) >= gen then
  redis.call('HSET', KEYS[1], 'price_cents', ARGV[3], 'gen', ARGV[4])
end
local stock = redis.call('HINCRBY', KEYS[1], 'stock', units)
redis.call('HINCRBY', KEYS[1], 'got', units)
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], 'stripe_units', units)
redis.call('HINCRBY', KEYS[2], 'received_units', units)
redis.call('HINCRBY', KEYS[2], 'changes', 1)
return {200, cjson.encode({stock = tostring(stock)}), 1}
