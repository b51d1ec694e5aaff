#!lua
-- reserve_grant: a grant's first step on the phone's partition Q, reserve_stock's grant
-- form (docs/escrow.md, section 4). A grant (a refill of the stripe of phone X on host
-- partition S) is a reservation under a grant id G minted in S: the units move from the
-- pool's stock to held exactly as an order's do, and the grant's commit point is its
-- receipt on S (receive_grant.lua). The settler fences a grant whose app died on S
-- (fence_orders.lua, grant kind) and settles it with settle_reservation: held -> lent
-- when the receipt is there, held -> stock when not.
-- A sibling of reserve_stock.lua, not a flag of it: its keys (the phone's stripe hosts and
-- grants in flight) and refusals are its own, and reserve_stock stays as it is.
-- Refused unless the phone's mode is striped (its pool may grant; a draining phone's may
-- not); the units are the wanted units, at most (stock - floor) / shares (the floor stays
-- in the pool for the saga's tail; shares: the other primaries' stripes), and refused
-- below the minimum (a smaller grant does not pay: docs/escrow.md, section 4).
-- Records rv{Q}[G] = "g <S> <gen> X:units:price" (app/vocabulary.py: encode_grant; gen and
-- price read now, atomically with the units held), rd{Q}[G] = its expiry, adds S to the
-- phone's stripe hosts and "S:G" to its grants in flight (what a recall fences).
-- Idempotent by grant id, as reserve_stock is by order id: a second run finds the
-- reservation and answers it without holding anything again; refused once this partition
-- released the grant (its tombstone), and past its expiry. Nothing is written before the
-- last check.
--
-- KEYS[1]  rv{Q}  hash: order or grant id -> reserved lines
-- KEYS[2]  rd{Q}  zset: order or grant id by expiry (ms), the settler's work list
-- KEYS[3]  rx{Q}  hash: order or grant id -> released (the release tombstones)
-- KEYS[4]  lg{Q}  hash: the partition's ledger (stock_units, held_units, changes)
-- KEYS[5]  p{Q}<phone_id>   the phone (price_cents, stock, held, gen, mode)
-- KEYS[6]  sh{Q}<phone_id>  set: the host partitions holding a stripe of the phone
-- KEYS[7]  sg{Q}<phone_id>  set: "<host>:<grant id>" of the phone's grants in flight
-- ARGV[1]  grant id G (minted in the host partition)
-- ARGV[2]  expiry, ms since the epoch (now + RESERVATION_TTL)
-- ARGV[3]  the host partition S
-- ARGV[4]  the phone id
-- ARGV[5]  units wanted (>= 1)
-- ARGV[6]  the floor: units the pool keeps (STRIPE_FLOOR)
-- ARGV[7]  shares: the stripes the pool above the floor is shared by (N - 1 primaries)
-- ARGV[8]  the fewest units worth a grant (K_MIN)
--
-- Returns {http_status, payload_json, replayed}:
--   200, {reservation="g S gen X:units:price", units}, 0   reserved now
--   200, {reservation=..., units}, 1            reserved by an earlier run; nothing written
--   404, {code="phone_not_found", phone_ids=[X]}, 0        nothing written
--   409, {code="not_striped", mode}, 0          the pool may not grant; nothing written
--   409, {code="grant_short", available, units}, 0   fewer than the minimum above the
--                                               floor; nothing written
--   409, {code="order_released"}, 0             this partition already released the grant
--   409, {code="order_expired"}, 0              past the expiry; nothing written
--   error reply "reserve_grant: ..."            KEYS or ARGV do not fit; nothing written
--
-- encode_item, encode_grant, grant_in_flight, decode_items, now_ms, PHONE_MODE: the prelude
-- (app/lua_prelude.py).

if #KEYS ~= 7 or #ARGV ~= 8 then
  return redis.error_reply('reserve_grant: expected 7 keys and 8 arguments')
end
local grant_id, host, phone_id = ARGV[1], ARGV[3], ARGV[4]
local wanted, floor, shares, minimum =
  tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
if not (wanted and floor and shares and minimum) or wanted < 1 or shares < 1 or minimum < 1 then
  return redis.error_reply('reserve_grant: bad units, floor, shares or minimum')
end

local function answer(stored, replayed)
  local units = 0
  local _, _, lines = decode_grant(stored)
  for _, quantity in decode_items(lines) do
    units = units + tonumber(quantity)
  end
  return {200, cjson.encode({reservation = stored, units = tostring(units)}), replayed}
end

if redis.call('HEXISTS', KEYS[3], grant_id) == 1 then
  return {409, cjson.encode({code = 'order_released'}), 0}
end
local reserved = redis.call('HGET', KEYS[1], grant_id)
if reserved then
  return answer(reserved, 1)
end
if now_ms() > tonumber(ARGV[2]) then
  return {409, cjson.encode({code = 'order_expired'}), 0}
end
local row = redis.call('HMGET', KEYS[5], 'price_cents', 'stock', 'mode', 'gen')
if not row[1] then
  return {404, cjson.encode({code = 'phone_not_found', phone_ids = {phone_id}}), 0}
end
if row[3] ~= PHONE_MODE.striped then
  return {409, cjson.encode({code = 'not_striped', mode = row[3] or ''}), 0}
end
local stock = tonumber(row[2])
local units = math.min(wanted, math.floor((stock - floor) / shares))
if units < minimum then
  return {409, cjson.encode({code = 'grant_short', available = row[2], units = tostring(units)}), 0}
end

-- Every check passed: write.
local stored = encode_grant(host, row[4] or '0', encode_item(phone_id, units, row[1]))
redis.call('HINCRBY', KEYS[5], 'stock', -units)
redis.call('HINCRBY', KEYS[5], 'held', units)
redis.call('HSET', KEYS[1], grant_id, stored)
redis.call('ZADD', KEYS[2], ARGV[2], grant_id)
redis.call('SADD', KEYS[6], host)
redis.call('SADD', KEYS[7], grant_in_flight(host, grant_id))
redis.call('HINCRBY', KEYS[4], 'stock_units', -units)
redis.call('HINCRBY', KEYS[4], 'held_units', units)
redis.call('HINCRBY', KEYS[4], 'changes', 1)
return answer(stored, 0)
