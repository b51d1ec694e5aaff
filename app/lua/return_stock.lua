#!lua
-- return_stock: a cancel's give-back on one phone partition Q (docs/data-tier.md, 3.3).
-- The cancel refunded the money on the order's partition and left the order in its
-- take-back list; this puts the order's units of this partition back in stock:
-- from sold, or, when the order's reservation here was never settled (the app died
-- between commit and settle), from held, settling that reservation as committed in
-- the same step. Then the order joins this partition's taken-back set.
-- Idempotent by order id: a second run finds it in the taken-back set and moves
-- nothing. Nothing is written before the last check.
--
-- KEYS[1]  rr{Q}  set: order ids whose stock this partition took back
-- KEYS[2]  rv{Q}  hash: order id -> reserved lines
-- KEYS[3]  rd{Q}  zset: order id by expiry
-- KEYS[4]  lg{Q}  hash: the partition's ledger (stock_units, held_units, sold_units, changes)
-- KEYS[5..4+n]  the phone hash of each line, same order as ARGV[2]'s lines
-- ARGV[1]  order id
-- ARGV[2]  the order's lines in this partition, "phone_id:quantity:unit_price_cents;..."
--          in the order's items order (the phone keys were built from them)
-- ARGV[3]  stock ceiling: a give-back that would cross it is refused (app/fields.py)
--
-- Returns {http_status, payload_json, returned}:
--   200, {returned="1", units, from="sold"|"held"}, 1   given back now
--   200, {returned="0"}, 0                     taken back before; nothing written
--   409, {code="reservation_changed", lines}, 0  a held reservation here is not these
--        lines; nothing written
--   409, {code="sold_short"|"held_short", phone_id, have, quantity}, 0   fewer units
--        sold (held) than the order's line: a broken invariant; nothing written
--   409, {code="stock_limit", phone_id, stock, limit}, 0   nothing written
--   error reply "return_stock: ..."           KEYS do not fit ARGV; nothing written
--
-- decode_items: the prelude (app/lua_prelude.py).

local order_id, order_lines, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local lines = {}
for phone_id, quantity in decode_items(order_lines) do
  lines[#lines + 1] = {phone_id, tonumber(quantity)}
end
if #lines < 1 or #KEYS ~= 4 + #lines then
  return redis.error_reply('return_stock: ' .. #KEYS .. ' keys for ' .. #lines .. ' lines')
end
if redis.call('SISMEMBER', KEYS[1], order_id) == 1 then
  return {200, cjson.encode({returned = '0'}), 0}
end

-- Still held here: the same phones and quantities, or the caller's lines are wrong.
local reserved = redis.call('HGET', KEYS[2], order_id)
local source = 'sold'
if reserved then
  local i = 0
  for phone_id, quantity in decode_items(reserved) do
    i = i + 1
    if not lines[i] or lines[i][1] ~= phone_id or lines[i][2] ~= tonumber(quantity) then
      return {409, cjson.encode({code = 'reservation_changed', lines = reserved}), 0}
    end
  end
  if i ~= #lines then
    return {409, cjson.encode({code = 'reservation_changed', lines = reserved}), 0}
  end
  source = 'held'
end

for i, line in ipairs(lines) do
  local row = redis.call('HMGET', KEYS[4 + i], source, 'stock')
  local have, stock = tonumber(row[1] or '0'), tonumber(row[2] or '0')
  if have < line[2] then
    return {409, cjson.encode({code = source .. '_short', phone_id = line[1],
      have = tostring(have), quantity = tostring(line[2])}), 0}
  end
  if stock + line[2] > limit then
    return {409, cjson.encode({code = 'stock_limit', phone_id = line[1],
      stock = tostring(stock), limit = ARGV[3]}), 0}
  end
end

-- Every check passed: write. A held reservation settles as committed and its units
-- leave sold again at once, so they move from held to stock directly.
local units = 0
for i, line in ipairs(lines) do
  redis.call('HINCRBY', KEYS[4 + i], source, -line[2])
  redis.call('HINCRBY', KEYS[4 + i], 'stock', line[2])
  units = units + line[2]
end
if reserved then
  redis.call('HDEL', KEYS[2], order_id)
  redis.call('ZREM', KEYS[3], order_id)
end
redis.call('SADD', KEYS[1], order_id)
redis.call('HINCRBY', KEYS[4], source .. '_units', -units)
redis.call('HINCRBY', KEYS[4], 'stock_units', units)
redis.call('HINCRBY', KEYS[4], 'changes', 1)
return {200, cjson.encode({returned = '1', units = tostring(units), from = source}), 1}
