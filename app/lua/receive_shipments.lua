#!lua
-- receive_shipments: a recall's last step, on phone X's partition Q (docs/escrow.md,
-- section 5), with what each close_stripe.lua answered: its fenced grants and its shipment.
--   1. Settles each fenced grant's reservation still held here (rv{Q}[G], the grant form
--      "g <S> <gen> X:k:<price>"): received -> its units move held -> lent (they were in
--      the stripe, and come home with its shipment); aborted -> held -> stock, with a
--      release tombstone (rx{Q}) that refuses a late grant reserve. Either way "S:G"
--      leaves X's grants in flight (sg{Q}X). A grant settled before (its reservation gone)
--      only leaves sg{Q}X.
--   2. Receives each shipment R = "X:S:epoch" once (idempotent by R in rr{Q}, the
--      take-back set): stock += units, sold += sold, lent -= units + sold, the partition's
--      ledger the same way. Every host S whose close answered (with a shipment, or none:
--      its stripe never existed) leaves X's stripe hosts (sh{Q}X): its stripe is closed
--      and empty, and no grant can open it again while the phone drains.
--   3. When no stripe host and no grant in flight is left and lent is 0, a draining
--      phone goes back to pool only (its mode goes), drained (the striping rule leaves it
--      until a restock), and leaves the settler's recall list; its `recalls` (recalls
--      ended) goes up by one.
-- A stale receipt (its drain read fewer ended recalls than the phone now has: another
-- recall ended in between, and the phone may have been striped and granted again since)
-- does 1 and 2 but takes no host off sh{Q}X and does not end the draining: a host its
-- closes emptied may hold a new grant's units by now (each grant and shipment it settles
-- is named by id, so those moves stay exact).
-- Nothing is written before the last check of the whole call.
--
-- KEYS[1]   p{Q}<phone_id>   hash: the phone (stock, held, sold, lent, mode)
-- KEYS[2]   sh{Q}<phone_id>  set: its stripe hosts
-- KEYS[3]   sg{Q}<phone_id>  set: "<host>:<grant id>" of its grants in flight
-- KEYS[4]   rr{Q}            set: order and shipment ids this partition took back
-- KEYS[5]   rv{Q}            hash: reservations (a grant's under its grant id)
-- KEYS[6]   rd{Q}            zset: reservation ids by expiry
-- KEYS[7]   rx{Q}            hash: release tombstones
-- KEYS[8]   xd{Q}            zset: tombstone ids by when they may be pruned (ms)
-- KEYS[9]   lg{Q}            hash: the partition's ledger
-- KEYS[10]  sw{Q}            zset: phone ids whose recall the settler finishes
-- ARGV[1]   phone id X
-- ARGV[2]   keep-until of a tombstone written now, ms since the epoch
-- ARGV[3]   the recalls ended that this recall's drain read (drain_phone.lua's `recalls`)
-- ARGV[4]   g, the number of grants
-- ARGV[5..4+3g]   host, grant id, "received"|"aborted" for each grant
-- ARGV[5+3g..]    host, shipment id, "X:units:sold:epoch" for each host closed (both ""
--                 when its close answered no shipment)
--
-- Returns {http_status, payload_json, wrote}:
--   200, {received=[shipment ids received now], settled="n" (grants settled now),
--         stock, lent, mode ("" for pool only), stale=true|false}, 0|1
--   404, {code="phone_not_found", phone_ids=[X]}, 0            nothing written
--   409, {code="held_short", held, quantity}, 0                 nothing written
--   409, {code="lent_short", lent, quantity}, 0                 nothing written
--   error reply "receive_shipments: ..."   bad arguments, or a grant or shipment of
--                                          another phone; nothing written
--
-- decode_items, decode_grant, decode_shipment, grant_in_flight, PHONE_MODE, end_recall: the
-- prelude (app/lua_prelude.py).

local phone_id = ARGV[1]
local grants = tonumber(ARGV[4])
if #KEYS ~= 10 or not tonumber(ARGV[2]) or not tonumber(ARGV[3]) or not grants
    or (#ARGV - 4 - 3 * grants) % 3 ~= 0 then
  return redis.error_reply('receive_shipments: 10 keys, phone id, keep-until, recalls ended,'
    .. ' grant and shipment triples')
end
local function fmt(n)
  return string.format('%d', n)
end
local function fail(why)
  return redis.error_reply('receive_shipments: ' .. why)
end

local row = redis.call('HMGET', KEYS[1], 'price_cents', 'held', 'lent', 'mode', 'recalls')
if not row[1] then
  return {404, cjson.encode({code = 'phone_not_found', phone_ids = {phone_id}}), 0}
end
local held, lent = tonumber(row[2] or '0'), tonumber(row[3] or '0')
local stale = tonumber(row[5] or '0') ~= tonumber(ARGV[3])

-- Check every grant and shipment, adding up the moves, before any write.
local settles, held_out, to_lent, to_stock = {}, 0, 0, 0
for i = 0, grants - 1 do
  local host, grant_id, outcome = ARGV[5 + 3 * i], ARGV[6 + 3 * i], ARGV[7 + 3 * i]
  if outcome ~= 'received' and outcome ~= 'aborted' then
    return fail('outcome must be received or aborted')
  end
  local stored = redis.call('HGET', KEYS[5], grant_id)
  local units = 0
  if stored then
    local _, _, grant_lines = decode_grant(stored)
    for line_phone, quantity in decode_items(grant_lines or stored) do
      if line_phone ~= phone_id then
        return fail('grant ' .. grant_id .. ' is not of phone ' .. phone_id)
      end
      units = units + tonumber(quantity)
    end
    held_out = held_out + units
    if outcome == 'received' then
      to_lent = to_lent + units
    else
      to_stock = to_stock + units
    end
  end
  settles[#settles + 1] = {host = host, id = grant_id, outcome = outcome, units = units, held = stored}
end
if held < held_out then
  return {409, cjson.encode({code = 'held_short', held = fmt(held), quantity = fmt(held_out)}), 0}
end
local shipments, closed_hosts, back, back_sold, seen = {}, {}, 0, 0, {}
for i = 5 + 3 * grants, #ARGV, 3 do
  local host, id, shipment = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  closed_hosts[#closed_hosts + 1] = host
  local ship_phone, units, sold = decode_shipment(shipment)
  if id ~= '' and ship_phone ~= phone_id then
    return fail('shipment ' .. id .. ' is not of phone ' .. phone_id)
  end
  if id ~= '' and not seen[id] and redis.call('SISMEMBER', KEYS[4], id) == 0 then
    seen[id] = true
    shipments[#shipments + 1] = {host = host, id = id, units = tonumber(units), sold = tonumber(sold)}
    back, back_sold = back + tonumber(units), back_sold + tonumber(sold)
  end
end
if lent + to_lent < back + back_sold then
  return {409, cjson.encode({code = 'lent_short', lent = fmt(lent + to_lent),
    quantity = fmt(back + back_sold)}), 0}
end

-- Every check passed: write.
local wrote, settled = 0, 0
for _, grant in ipairs(settles) do
  if grant.held then
    redis.call('HINCRBY', KEYS[1], 'held', fmt(-grant.units))
    redis.call('HDEL', KEYS[5], grant.id)
    redis.call('ZREM', KEYS[6], grant.id)
    settled, wrote = settled + 1, 1
  end
  if grant.outcome == 'aborted' and redis.call('HSET', KEYS[7], grant.id, 'released') == 1 then
    redis.call('ZADD', KEYS[8], 'GT', ARGV[2], grant.id)
    wrote = 1
  end
  if redis.call('SREM', KEYS[3], grant_in_flight(grant.host, grant.id)) == 1 then
    wrote = 1
  end
end
if to_lent > 0 then
  redis.call('HINCRBY', KEYS[1], 'lent', to_lent)
end
if to_stock > 0 then
  redis.call('HINCRBY', KEYS[1], 'stock', to_stock)
end
local received = {}
for _, shipment in ipairs(shipments) do
  redis.call('SADD', KEYS[4], shipment.id)
  received[#received + 1] = shipment.id
end
if not stale then
  for _, host in ipairs(closed_hosts) do
    if redis.call('SREM', KEYS[2], host) == 1 then
      wrote = 1
    end
  end
end
if #shipments > 0 then
  redis.call('HINCRBY', KEYS[1], 'stock', back)
  redis.call('HINCRBY', KEYS[1], 'sold', back_sold)
  redis.call('HINCRBY', KEYS[1], 'lent', fmt(-(back + back_sold)))
  wrote = 1
end
local moves = {held_units = -held_out, lent_units = to_lent - back - back_sold,
  stock_units = to_stock + back, sold_units = back_sold}
local moved = false
for name, by in pairs(moves) do
  if by ~= 0 then
    redis.call('HINCRBY', KEYS[9], name, fmt(by))
    moved = true
  end
end
if moved then
  redis.call('HINCRBY', KEYS[9], 'changes', 1)
end

local after = redis.call('HMGET', KEYS[1], 'stock', 'lent', 'mode')
local mode = after[3] or ''
if not stale and mode == PHONE_MODE.draining and tonumber(after[2] or '0') == 0
    and redis.call('SCARD', KEYS[2]) == 0 and redis.call('SCARD', KEYS[3]) == 0 then
  end_recall(KEYS[1], KEYS[10], phone_id)
  mode, wrote = '', 1
end
return {200, cjson.encode({received = received, settled = fmt(settled), stock = after[1],
  lent = after[2] or '0', mode = mode, stale = stale}), wrote}
