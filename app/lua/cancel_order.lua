-- cancel_order: move an open order to cancelled, refund its total to the
-- customer and put every line back in stock, move the ledger's running totals
-- the same way, then append order.cancelled.
-- Cancelling a cancelled order again changes nothing; one in any other status
-- (completed today) is refused with that status.
--
-- Key names: app/keys.py; P is the order's (and its owner's) partition, Q a
-- phone's, maybe another: the saga's cancel collapsed (docs/data-tier.md, 3.9), run
-- only where one node serves P and every Q (app/lua_prelude.py: across_slots).
-- Its stripe form (ARGV[9] given: an order sold from stripes, docs/escrow.md section 6)
-- gives the lines back to the stripes they were sold from, on host partition S (the
-- order's stripe mark "<S>:<epoch>"), while each is open at the mark's epoch: stock +q,
-- sold -q, and the host ledger's stripe_units +units, stripe_sold_units -units. A stripe
-- closed since (another epoch: its sold went home with its shipment) answers
-- stripe_closed with nothing written: the caller gives the units back to the pools.
--
-- KEYS[1]  o{P}<order_id>                    hash
-- KEYS[2]  c{P}<owner_id>                    hash
-- KEYS[3]  os{P}open:<k>                     zset, chunk k = ARGV[8] (docs/data-tier.md 10.2)
-- KEYS[4]  os{P}cancelled:<k>                zset
-- KEYS[5]  co{P}<owner_id>:open              zset
-- KEYS[6]  co{P}<owner_id>:cancelled         zset
-- KEYS[7]  e{P}                              the order partition's events stream
-- KEYS[8]  lg{P}                             hash, the customer side's running totals
-- KEYS[9]  od{P}open, KEYS[10] od{P}cancelled     zsets, the statuses' non-empty chunks
-- KEYS[11] on{P}open, KEYS[12] on{P}cancelled     hashes, their orders per chunk, group
-- KEYS[13] ok{P}                             hash, read: the chunks' starts
-- KEYS[14] os{P}open:<k+1>, KEYS[15] os{P}cancelled:<k+1>   zsets, the next chunk's
-- KEYS[16..15+n]      p{Q}<phone_id> for each of the order's n lines, in order
-- KEYS[16+n..15+2n]   lg{Q} of each line's phone, same order (may repeat)
-- KEYS[16+2n..15+3n]  rv{Q} of each line's phone, same order (may repeat): only read
--   stripe form, instead: KEYS[16..15+n] sq{S}<phone_id> of each line, in order, and
--   KEYS[16+n] lg{S} (lg{P} itself when S = P)
-- ARGV[1]  owner id the keys above were built for
-- ARGV[2]  requesting customer id, or "" for the admin
-- ARGV[3]  now, ms since the epoch
-- ARGV[4]  request id (carried into the event)
-- ARGV[5]  the order's items field as the caller read it (the phone side's keys
--          were built from it; an order's items never change, this proves it)
-- ARGV[6]  balance ceiling, ARGV[7] stock ceiling: a refund or a restock that
--          would cross one is refused (app/fields.py: every sum below 2^53)
-- ARGV[8]  the chunk KEYS[3..4] are for: the id's (id_chunk), or what a refusal answered
-- ARGV[9]  stripe form only: the epoch of the order's stripe mark
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
--   307, {code="stripe_closed", phone_id}  stripe form: a line's stripe is closed or at
--        another epoch than the mark's; nothing written (the caller gives the units back
--        to the pools: app/orders/stripe_cancel.py)
--   409, {code="sold_short", phone_id, have, quantity}  stripe form: the stripe sold
--        fewer units than the line (a broken invariant); nothing written
--   409, {code="order_chunk_moved", chunk}  the order's chunk (chunk) is neither ARGV[8] nor the next:
--                                       nothing written; the app retries with chunk's keys
--
-- STATUS, ORDER_EVENT, decode_items, ORDER_FIELD, order_id_of,
-- order_map, order_total, chunk_lists, chunk_enter, chunk_leave: the prelude (app/lua_prelude.py).

local order = redis.call('HMGET', KEYS[1], ORDER_FIELD.customer_id, ORDER_FIELD.status,
  ORDER_FIELD.seq, ORDER_FIELD.items, ORDER_FIELD.total_cents, ORDER_FIELD.chunk)
local owner, status, seq, items = order[1], order[2], order[3], order[4]
local chunk_field = order[6]
local order_id = order_id_of(KEYS[1])
if not owner or (ARGV[2] ~= '' and ARGV[2] ~= owner) then
  return {404, cjson.encode({code = 'order_not_found'}), 0}
end
-- Only for an order that exists: a missing one has no items to sum.
local total = order_total(order[5], items)  -- the items' sum where the hash has no total
if owner ~= ARGV[1] or items ~= ARGV[5] then
  return {409, cjson.encode({code = 'order_owner_changed'}), 0}
end
local line_count = 0
for _ in decode_items(items) do
  line_count = line_count + 1
end
local stripe_epoch = ARGV[9]
if #KEYS ~= (stripe_epoch and 16 + line_count or 15 + 3 * line_count) then
  return {409, cjson.encode({code = 'order_owner_changed'}), 0}
end

if status == STATUS.cancelled then
  return {200, cjson.encode(order_map(KEYS[1])), 0}
end
if status ~= STATUS.open then
  -- Only an open order can be cancelled; any other is refused by its status.
  return {409, cjson.encode({code = 'order_' .. status}), 0}
end

-- Each line's reservations, phone and ledger: every one read here, before the first
-- write (on a cluster node a key it does not serve is refused at its first use).
-- The stripe form reads each line's stripe instead: open at the mark's epoch, with the
-- line's units sold.
local lines = {}
for phone_id, quantity in decode_items(items) do
  local i = #lines + 1
  local line = {id = phone_id, phone = KEYS[15 + i], quantity = tonumber(quantity)}
  if stripe_epoch then
    line.ledger = KEYS[16 + line_count]
    local stripe = redis.call('HMGET', line.phone, 'epoch', 'closed', 'sold', 'stock')
    if (stripe[1] or '0') ~= stripe_epoch or stripe[2] then
      return {307, cjson.encode({code = 'stripe_closed', phone_id = phone_id}), 0}
    end
    if tonumber(stripe[3] or '0') < line.quantity then
      return {409, cjson.encode({code = 'sold_short', phone_id = phone_id,
        have = stripe[3] or '0', quantity = quantity}), 0}
    end
    line.stock = stripe[4] or '0'
  else
    if redis.call('HEXISTS', KEYS[15 + 2 * line_count + i], order_id) == 1 then
      return {307, cjson.encode({code = 'reservation_held'}), 0}
    end
    line.ledger = KEYS[15 + line_count + i]
    line.stock = redis.call('HGET', line.phone, 'stock') or '0'
  end
  redis.call('EXISTS', line.ledger)
  lines[i] = line
end

local balance = redis.call('HGET', KEYS[2], 'balance_cents') or '0'
if tonumber(balance) + tonumber(total) > tonumber(ARGV[6]) then
  return {409, cjson.encode({code = 'balance_limit', balance_cents = balance, limit = ARGV[6]}), 0}
end
for _, line in ipairs(lines) do
  if tonumber(line.stock) + line.quantity > tonumber(ARGV[7]) then
    return {409, cjson.encode({code = 'stock_limit', phone_id = line.id, stock = line.stock, limit = ARGV[7]}), 0}
  end
end

-- The order is in its id's chunk or the chunk its hash says (app/keys.py); the keys are
-- for ARGV[8] and the one after it (a place that met a rollover on its way).
local chunk, lists = chunk_lists(chunk_field, order_id, ARGV[8], {KEYS[3], KEYS[4]}, {KEYS[14], KEYS[15]})
if not lists then
  return {409, cjson.encode({code = 'order_chunk_moved', chunk = chunk}), 0}
end
local from, to = lists[1], lists[2]

-- Every check passed: write.
local units = 0
local moved = {[KEYS[8]] = true}
local stock_units, sold_units = 'stock_units', 'sold_units'
if stripe_epoch then
  stock_units, sold_units = 'stripe_units', 'stripe_sold_units'
end
for _, line in ipairs(lines) do
  redis.call('HINCRBY', line.phone, 'stock', line.quantity)
  redis.call('HINCRBY', line.phone, 'sold', -line.quantity)
  units = units + line.quantity
  redis.call('HINCRBY', line.ledger, stock_units, line.quantity)
  redis.call('HINCRBY', line.ledger, sold_units, -line.quantity)
  if not moved[line.ledger] then
    moved[line.ledger] = true
    redis.call('HINCRBY', line.ledger, 'changes', 1)
  end
end
redis.call('HINCRBY', KEYS[2], 'balance_cents', total)
redis.call('HSET', KEYS[1], ORDER_FIELD.status, STATUS.cancelled)
chunk_leave(from, KEYS[9], KEYS[11], chunk, order_id)
chunk_enter(to, KEYS[10], KEYS[12], KEYS[13], chunk, seq, order_id)
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
