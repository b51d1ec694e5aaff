#!lua
-- return_to_stripe: a split cancel's give-back of an order sold from stripes, on their host
-- partition S (docs/escrow.md, section 6). The cancel refunded the money on the order's
-- partition and left the order on its take-back list; this puts the order's units back
-- in the stripes they were sold from, while each is open at the epoch of the order's
-- stripe mark: stock +q, sold -q, the host ledger's stripe_units +units and
-- stripe_sold_units -units. Then the order joins S's taken-back set. A stripe closed
-- since (another epoch: its sold went home with its shipment) answers stripe_closed with
-- nothing written: the caller gives the units back to the pools (return_stock.lua).
-- Idempotent by order id: a second run finds it in the taken-back set and moves nothing
-- (even if the stripe closed since). Nothing is written before the last check.
--
-- Key names: app/keys.py; every key is in S.
-- KEYS[1]  rr{S}  set: order ids whose units this partition took back
-- KEYS[2]  lg{S}  hash: the host partition's ledger (stripe_units, stripe_sold_units, changes)
-- KEYS[3..2+n]  sq{S}<phone_id> of each line, same order as ARGV[3]'s lines
-- ARGV[1]  order id
-- ARGV[2]  the epoch of the order's stripe mark
-- ARGV[3]  the order's lines, "phone_id:quantity:unit_price_cents;..." (its items)
-- ARGV[4]  stock ceiling: a give-back that would cross it is refused (app/fields.py)
--
-- Returns {http_status, payload_json, returned}:
--   200, {returned="1", units}, 1                  given back now
--   200, {returned="0"}, 0                         taken back before; nothing written
--   307, {code="stripe_closed", phone_id}, 0       a line's stripe is closed or at another
--                                                  epoch; nothing written
--   409, {code="sold_short", phone_id, have, quantity}, 0   the stripe sold fewer units
--        than the line: a broken invariant; nothing written
--   409, {code="stock_limit", phone_id, stock, limit}, 0    nothing written
--   error reply "return_to_stripe: ..."            KEYS do not fit ARGV; nothing written
--
-- decode_items: the prelude (app/lua_prelude.py).

local order_id, epoch, limit = ARGV[1], ARGV[2], tonumber(ARGV[4])
local lines = {}
for phone_id, quantity in decode_items(ARGV[3]) do
  lines[#lines + 1] = {phone_id, tonumber(quantity)}
end
if #lines < 1 or #KEYS ~= 2 + #lines then
  return redis.error_reply('return_to_stripe: ' .. #KEYS .. ' keys for ' .. #lines .. ' lines')
end
if redis.call('SISMEMBER', KEYS[1], order_id) == 1 then
  return {200, cjson.encode({returned = '0'}), 0}
end

for i, line in ipairs(lines) do
  local stripe = redis.call('HMGET', KEYS[2 + i], 'epoch', 'closed', 'sold', 'stock')
  if (stripe[1] or '0') ~= epoch or stripe[2] then
    return {307, cjson.encode({code = 'stripe_closed', phone_id = line[1]}), 0}
  end
  local sold, stock = tonumber(stripe[3] or '0'), tonumber(stripe[4] or '0')
  if sold < line[2] then
    return {409, cjson.encode({code = 'sold_short', phone_id = line[1],
      have = tostring(sold), quantity = tostring(line[2])}), 0}
  end
  if stock + line[2] > limit then
    return {409, cjson.encode({code = 'stock_limit', phone_id = line[1],
      stock = tostring(stock), limit = ARGV[4]}), 0}
  end
end

-- Every check passed: write.
local units = 0
for i, line in ipairs(lines) do
  redis.call('HINCRBY', KEYS[2 + i], 'sold', -line[2])
  redis.call('HINCRBY', KEYS[2 + i], 'stock', line[2])
  units = units + line[2]
end
redis.call('SADD', KEYS[1], order_id)
redis.call('HINCRBY', KEYS[2], 'stripe_sold_units', -units)
redis.call('HINCRBY', KEYS[2], 'stripe_units', units)
redis.call('HINCRBY', KEYS[2], 'changes', 1)
return {200, cjson.encode({returned = '1', units = tostring(units)}), 1}
