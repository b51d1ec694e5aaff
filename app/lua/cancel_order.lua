-- cancel_order: move an open order to cancelled, refund its total to the
-- customer and put every line back in stock, move the ledger's running totals
-- the same way, then append order.cancelled.
-- Cancelling a cancelled order again changes nothing; one in any other status
-- (completed today) is refused with that status.
--
-- Key names: app/keys.py; P is the order's (and its owner's) partition, Q a
-- phone's, maybe another: the saga's cancel collapsed (docs/data-tier.md, 3.9), run
-- only where one node serves P and every Q (app/lua_prelude.py: across_slots).
-- KEYS are P's only. The phone side (p{Q}<phone_id>, lg{Q}, rv{Q} of each line) is
-- built here from the order's items (phone_key, ledger_key_of, reservations_key_of:
-- app/keys.py's names in the prelude), so the caller need not read the order first:
-- on one redis-server every key is in reach; on a cluster node (across_slots) a key
-- it does not serve is refused at its first read, and each is read before any write.
--
-- KEYS[1]  o{P}<order_id>                    hash
-- KEYS[2]  c{P}<owner_id>                    hash
-- KEYS[3]  os{P}open                         zset
-- KEYS[4]  os{P}cancelled                    zset
-- KEYS[5]  co{P}<owner_id>:open              zset
-- KEYS[6]  co{P}<owner_id>:cancelled         zset
-- KEYS[7]  e{P}                              the order partition's events stream
-- KEYS[8]  lg{P}                             hash, the customer side's running totals
-- ARGV[1]  owner id the keys above were built for
-- ARGV[2]  requesting customer id, or "" for the admin
-- ARGV[3]  now, ms since the epoch
-- ARGV[4]  request id (carried into the event)
-- ARGV[5]  balance ceiling, ARGV[6] stock ceiling: a refund or a restock that
--          would cross one is refused (app/fields.py: every sum below 2^53)
--
-- Returns {http_status, payload_json, changed}:
--   200, order fields (strings), 1|0   cancelled now | was already cancelled
--   404, {code="order_not_found"}      missing, or not the requester's
--   409, {code="order_<status>"}       not open, e.g. order_completed; nothing written
--   409, {code="order_owner_changed"}  the caller's keys do not fit; nothing written
--   307, {code="reservation_held"}     a phone partition still holds the order's
--        reservation (a split order whose settle has not run: restocking here would
--        give back units still held); nothing written: the caller cancels by the
--        split saga, whose give-back settles it first (app/orders/saga_service.py)
--   409, {code="balance_limit", balance_cents, limit}  the refund would cross
--        the ceiling; nothing written (spend some, or complete the order)
--   409, {code="stock_limit", phone_id, stock, limit}  likewise for a line's restock
--
-- STATUS, ORDER_EVENT, decode_items, order_id_of, order_map: the prelude (app/lua_prelude.py).

local order = redis.call('HMGET', KEYS[1], 'customer_id', 'status', 'seq', 'items', 'total_cents')
local owner, status, seq, items, total = order[1], order[2], order[3], order[4], order[5]
local order_id = order_id_of(KEYS[1])
if not owner or (ARGV[2] ~= '' and ARGV[2] ~= owner) then
  return {404, cjson.encode({code = 'order_not_found'}), 0}
end
if owner ~= ARGV[1] or #KEYS ~= 8 then
  return {409, cjson.encode({code = 'order_owner_changed'}), 0}
end

if status == STATUS.cancelled then
  return {200, cjson.encode(order_map(KEYS[1])), 0}
end
if status ~= STATUS.open then
  -- Only an open order can be cancelled; any other is refused by its status.
  return {409, cjson.encode({code = 'order_' .. status}), 0}
end

-- Each line's phone, its partition's ledger, and its reservations: every one read
-- here, before the first write (see the header).
local lines = {}
for phone_id, quantity in decode_items(items) do
  local line = {id = phone_id, phone = phone_key(phone_id), ledger = ledger_key_of(phone_id),
    quantity = tonumber(quantity)}
  if redis.call('HEXISTS', reservations_key_of(phone_id), order_id) == 1 then
    return {307, cjson.encode({code = 'reservation_held'}), 0}
  end
  redis.call('EXISTS', line.ledger)
  line.stock = redis.call('HGET', line.phone, 'stock') or '0'
  lines[#lines + 1] = line
end

local balance = redis.call('HGET', KEYS[2], 'balance_cents') or '0'
if tonumber(balance) + tonumber(total) > tonumber(ARGV[5]) then
  return {409, cjson.encode({code = 'balance_limit', balance_cents = balance, limit = ARGV[5]}), 0}
end
for _, line in ipairs(lines) do
  if tonumber(line.stock) + line.quantity > tonumber(ARGV[6]) then
    return {409, cjson.encode({code = 'stock_limit', phone_id = line.id, stock = line.stock, limit = ARGV[6]}), 0}
  end
end

-- Every check passed: write.
local units = 0
local moved = {[KEYS[8]] = true}
for _, line in ipairs(lines) do
  redis.call('HINCRBY', line.phone, 'stock', line.quantity)
  redis.call('HINCRBY', line.phone, 'sold', -line.quantity)
  units = units + line.quantity
  redis.call('HINCRBY', line.ledger, 'stock_units', line.quantity)
  redis.call('HINCRBY', line.ledger, 'sold_units', -line.quantity)
  if not moved[line.ledger] then
    moved[line.ledger] = true
    redis.call('HINCRBY', line.ledger, 'changes', 1)
  end
end
redis.call('HINCRBY', KEYS[2], 'balance_cents', total)
redis.call('HSET', KEYS[1], 'status', STATUS.cancelled)
redis.call('ZREM', KEYS[3], order_id)
redis.call('ZADD', KEYS[4], seq, order_id)
redis.call('ZREM', KEYS[5], order_id)
redis.call('ZADD', KEYS[6], seq, order_id)
redis.call('HINCRBY', KEYS[8], 'open_cents', -tonumber(total))
redis.call('HINCRBY', KEYS[8], 'balance_cents', total)
redis.call('HINCRBY', KEYS[8], 'open_units', -units)
redis.call('HINCRBY', KEYS[8], 'orders_open', -1)
redis.call('HINCRBY', KEYS[8], 'orders_cancelled', 1)
redis.call('HINCRBY', KEYS[8], 'changes', 1)
redis.call('XADD', KEYS[7], '*', 'type', ORDER_EVENT.cancelled, 'order_id', order_id,
  'customer_id', owner, 'status', STATUS.cancelled, 'request_id', ARGV[4], 'at', ARGV[3])
return {200, cjson.encode(order_map(KEYS[1])), 1}
