#!lua
-- settle_reservation: the saga's confirm or cancel step on one phone partition Q
-- (docs/data-tier.md, 3.1 and 3.2), once the order's outcome is known (the commit's
-- answer, or the fence's on the order's partition).
--   committed: the reserved units move from held to sold; the reservation goes.
--   aborted:   they move from held back to stock; the reservation goes, and a release
--              tombstone stays, so a reserve arriving late for this order is refused
--              (it is written even when there was no reservation here: that late
--              reserve is exactly the one that would find none).
-- Idempotent by order id: a second run finds no reservation and moves nothing (an
-- abort rewrites the same tombstone), so a retried call answers settled = "0".
-- Nothing is written before the last check.
--
-- KEYS[1]  rv{Q}  hash: order id -> reserved lines
-- KEYS[2]  rd{Q}  zset: order id by expiry
-- KEYS[3]  rx{Q}  hash: order id -> released
-- KEYS[4]  lg{Q}  hash: the partition's ledger (stock_units, held_units, sold_units, changes)
-- KEYS[5..4+n]  the phone hash of each reserved line, in the reservation's order
-- ARGV[1]  order id
-- ARGV[2]  "committed" or "aborted"
-- ARGV[3]  the reservation's lines as the caller read them (rv{Q}[order id]), or ""
--          when it found none; the phone keys were built from them
--
-- Returns {http_status, payload_json, settled}:
--   200, {outcome, settled="1"}, 1      the units moved now
--   200, {outcome, settled="0"}, 0      no reservation (settled before); an abort
--                                       (re)wrote the tombstone
--   409, {code="reservation_changed", lines}, 0   the stored reservation is not the
--        caller's ARGV[3] (read it again); nothing written
--   409, {code="held_short", phone_id, held, quantity}, 0   a phone holds fewer units
--        than the reservation (a broken invariant); nothing written
--   error reply "settle_reservation: ..."  bad outcome or KEYS do not fit; nothing written
--
-- decode_items: the prelude (app/lua_prelude.py).

local order_id, outcome, caller_lines = ARGV[1], ARGV[2], ARGV[3]
if outcome ~= 'committed' and outcome ~= 'aborted' then
  return redis.error_reply('settle_reservation: outcome must be committed or aborted')
end
local stored = redis.call('HGET', KEYS[1], order_id)
if (stored or '') ~= caller_lines then
  return {409, cjson.encode({code = 'reservation_changed', lines = stored or ''}), 0}
end

local lines = {}
if stored then
  for phone_id, quantity in decode_items(stored) do
    lines[#lines + 1] = {phone_id, tonumber(quantity)}
  end
end
if #KEYS ~= 4 + #lines then
  return redis.error_reply('settle_reservation: ' .. #KEYS .. ' keys for ' .. #lines .. ' lines')
end
for i, line in ipairs(lines) do
  local held = tonumber(redis.call('HGET', KEYS[4 + i], 'held') or '0')
  if held < line[2] then
    return {409, cjson.encode({code = 'held_short', phone_id = line[1], held = tostring(held),
      quantity = tostring(line[2])}), 0}
  end
end

-- Every check passed: write.
if outcome == 'aborted' then
  redis.call('HSET', KEYS[3], order_id, 'released')
end
if not stored then
  return {200, cjson.encode({outcome = outcome, settled = '0'}), 0}
end
local target = outcome == 'committed' and 'sold' or 'stock'
local units = 0
for i, line in ipairs(lines) do
  redis.call('HINCRBY', KEYS[4 + i], 'held', -line[2])
  redis.call('HINCRBY', KEYS[4 + i], target, line[2])
  units = units + line[2]
end
redis.call('HDEL', KEYS[1], order_id)
redis.call('ZREM', KEYS[2], order_id)
redis.call('HINCRBY', KEYS[4], 'held_units', -units)
redis.call('HINCRBY', KEYS[4], target .. '_units', units)
redis.call('HINCRBY', KEYS[4], 'changes', 1)
return {200, cjson.encode({outcome = outcome, settled = '1'}), 1}
