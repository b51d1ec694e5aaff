#!lua
-- reserve_stock: the saga's try step on one phone partition Q (docs/data-tier.md, 3.1).
-- Validates every line of this partition (the phone exists, stock >= quantity), then
-- moves the units from stock to held, records the reservation with the unit prices
-- read now (atomically with the units held, so the commit charges exactly these) and
-- its expiry, and moves the partition's ledger the same way. Nothing is written
-- before the last check.
-- Idempotent by order id: redis-py's cluster client retries after a connection error
-- and the first run may have happened, so a second run finds the reservation and
-- answers the same lines without holding anything again. Refused once this partition
-- released the order (its tombstone): a late try must not run after its cancel. Refused
-- too past its expiry by Redis TIME, so that the tombstone need not outlive the expiry
-- (the settler prunes it later: docs/data-tier.md, 3.2).
-- The 409 rule (docs/escrow.md, section 5): a short line is out_of_stock only when its
-- phone has no units lent to stripes (`lent` absent or 0). With lent > 0 the call answers
-- stock_lent and writes nothing: the caller drains the phone and recalls its stripes
-- (app/orders/recall.py: drain_phone.lua sets mode = draining, which stops new grants),
-- then sends this reserve again.
-- The striping rule (docs/escrow.md, section 4; only when the caller sends ARGV[#ARGV],
-- the app's ESCROW_STRIPES setting): every reserve here is an apart order's (a collapsed
-- order never reserves), so each reserved line counts one in its phone's hash, in a field
-- reset per horizon (`apart`, and `apart_at`: the horizon it counts); a phone that is hot
-- and deep (at least `hot` apart reserves in this horizon and at least `stripe_min`
-- units left in its pool) and has no mode is set striped, and the answer names it, so
-- that the app grants its first stripes. A phone a recall drained (`drained`, until a
-- restock) is not striped again: its pool's tail goes by the saga (no ping-pong).
--
-- KEYS[1]  rv{Q}  hash: order id -> reserved lines "phone_id:quantity:unit_price_cents;..."
-- KEYS[2]  rd{Q}  zset: order id by expiry (ms), the settler's work list
-- KEYS[3]  rx{Q}  hash: order id -> released (the release tombstones)
-- KEYS[4]  lg{Q}  hash: the partition's ledger (stock_units, held_units, changes)
-- KEYS[5..4+n]  the phone hash of each line, same order as the lines
-- ARGV[1]  order id
-- ARGV[2]  expiry, ms since the epoch (now + RESERVATION_TTL)
-- ARGV[3..2+2n]  phone_id, quantity for each line of this partition (quantities
--                1..100 and distinct phone ids, checked by the caller)
-- ARGV[3+2n]     optional, the striping rule: "<stripe_min> <hot> <horizon_ms>"
--
-- Returns {http_status, payload_json, replayed}:
--   200, {lines="..."}, 0                       reserved now
--   200, {lines="...", striped=[phone ids]}, 0  reserved now, and these phones were set
--                                               striped by the rule
--   200, {lines="..."}, 1                       reserved by an earlier run; nothing written
--   404, {code="phone_not_found", phone_ids=[]}, 0     nothing written
--   409, {code="out_of_stock", lines=[...]}, 0         nothing written (every short line's
--                                               phone has lent = 0)
--   409, {code="stock_lent", phone_ids=[]}, 0   short lines whose phones have units lent
--                                               out; nothing written
--   409, {code="order_released"}, 0             this partition already released the order
--   409, {code="order_expired"}, 0              past the expiry; nothing written
--   error reply "reserve_stock: ..."            KEYS do not fit ARGV; nothing written
--
-- encode_item(s), now_ms, PHONE_MODE: the prelude (app/lua_prelude.py).

local n = math.floor((#ARGV - 2) / 2)
local rule = #ARGV == 3 + 2 * n and ARGV[#ARGV] or nil
if n < 1 or #KEYS ~= 4 + n then
  return redis.error_reply('reserve_stock: ' .. #KEYS .. ' keys do not fit ' .. #ARGV .. ' arguments')
end
local order_id = ARGV[1]

if redis.call('HEXISTS', KEYS[3], order_id) == 1 then
  return {409, cjson.encode({code = 'order_released'}), 0}
end
local reserved = redis.call('HGET', KEYS[1], order_id)
if reserved then
  return {200, cjson.encode({lines = reserved}), 1}
end
if now_ms() > tonumber(ARGV[2]) then
  return {409, cjson.encode({code = 'order_expired'}), 0}
end

local missing, short, lent, prices = {}, {}, {}, {}
for i = 1, n do
  local phone_id, quantity = ARGV[1 + 2 * i], tonumber(ARGV[2 + 2 * i])
  if not quantity or quantity < 1 then
    return redis.error_reply('reserve_stock: bad quantity for ' .. phone_id)
  end
  local row = redis.call('HMGET', KEYS[4 + i], 'price_cents', 'stock')
  if not row[1] then
    missing[#missing + 1] = phone_id
  else
    if tonumber(row[2]) < quantity then
      short_line(KEYS[4 + i], phone_id, ARGV[2 + 2 * i], row[2], lent, short)
    end
    prices[i] = row[1]
  end
end
if #missing > 0 then
  return {404, cjson.encode({code = 'phone_not_found', phone_ids = missing}), 0}
end
if #lent > 0 then
  return {409, cjson.encode({code = 'stock_lent', phone_ids = lent}), 0}
end
if #short > 0 then
  return {409, cjson.encode({code = 'out_of_stock', lines = short}), 0}
end

-- Every check passed: write.
local lines, units = {}, 0
for i = 1, n do
  local quantity = ARGV[2 + 2 * i]
  redis.call('HINCRBY', KEYS[4 + i], 'stock', -tonumber(quantity))
  redis.call('HINCRBY', KEYS[4 + i], 'held', quantity)
  units = units + tonumber(quantity)
  lines[i] = encode_item(ARGV[1 + 2 * i], quantity, prices[i])
end
local encoded = encode_items(lines)
redis.call('HSET', KEYS[1], order_id, encoded)
redis.call('ZADD', KEYS[2], ARGV[2], order_id)
redis.call('HINCRBY', KEYS[4], 'stock_units', -units)
redis.call('HINCRBY', KEYS[4], 'held_units', units)
redis.call('HINCRBY', KEYS[4], 'changes', 1)
if not rule then
  return {200, cjson.encode({lines = encoded}), 0}
end
local stripe_min, hot, horizon_ms = string.match(rule, '^(%d+) (%d+) (%d+)$')
if not horizon_ms or tonumber(horizon_ms) < 1 then
  return redis.error_reply('reserve_stock: the striping rule is "<stripe_min> <hot> <horizon_ms>"')
end
local horizon, striped = tostring(math.floor(now_ms() / tonumber(horizon_ms))), {}
for i = 1, n do
  local row = redis.call('HMGET', KEYS[4 + i], 'apart_at', 'mode', 'stock', 'drained')
  local apart = 1
  if row[1] == horizon then
    apart = redis.call('HINCRBY', KEYS[4 + i], 'apart', 1)
  else
    redis.call('HSET', KEYS[4 + i], 'apart_at', horizon, 'apart', 1)
  end
  if not row[2] and not row[4] and apart >= tonumber(hot)
      and tonumber(row[3]) >= tonumber(stripe_min) then
    redis.call('HSET', KEYS[4 + i], 'mode', PHONE_MODE.striped)
    striped[#striped + 1] = ARGV[1 + 2 * i]
  end
end
if #striped == 0 then
  return {200, cjson.encode({lines = encoded}), 0}
end
return {200, cjson.encode({lines = encoded, striped = striped}), 0}
