#!lua
-- refund_order: a cancel's first step for an order placed by the reservation saga, on the
-- order's partition P (docs/data-tier.md, 3.3): move an open order to cancelled, refund
-- its total to the customer, move the customer side of the ledger, append
-- order.cancelled, and put the order on the take-back list ro{P}, due at ARGV[6]. The
-- stock goes back afterwards on each phone's partition (return_stock.lua), by the
-- request or, if its app died, by the settler when the entry falls due.
-- Cancelling a cancelled order again changes nothing (the take-back list keeps it until
-- the stock is back); one in any other status is refused with that status.
--
-- Key names: app/keys.py; every key is in P.
-- KEYS[1]  o{P}<order_id>                    hash
-- KEYS[2]  c{P}<owner_id>                    hash
-- KEYS[3]  os{P}open:<k>                     zset, chunk k = ARGV[7] (docs/data-tier.md 10.2)
-- KEYS[4]  os{P}cancelled:<k>                zset
-- KEYS[5]  co{P}<owner_id>:open              zset
-- KEYS[6]  co{P}<owner_id>:cancelled         zset
-- KEYS[7]  e{P}                              the partition's events stream
-- KEYS[8]  lg{P}, the order partition's ledger    hash (customer side)
-- KEYS[9]  ro{P}                                     zset: order id by take-back due time
-- KEYS[10] od{P}open, KEYS[11] od{P}cancelled     zsets, the statuses' non-empty chunks
-- KEYS[12] on{P}open, KEYS[13] on{P}cancelled     hashes, their orders per chunk, group
-- KEYS[14] ok{P}                             hash, read: the chunks' starts
-- KEYS[15] os{P}open:<k+1>, KEYS[16] os{P}cancelled:<k+1>   zsets, the next chunk's
-- ARGV[1]  owner id the keys above were built for
-- ARGV[2]  requesting customer id, or "" for the admin
-- ARGV[3]  now, ms since the epoch
-- ARGV[4]  request id (carried into the event)
-- ARGV[5]  balance ceiling: a refund that would cross it is refused (app/fields.py)
-- ARGV[6]  when the take-back falls due for the settler, ms since the epoch
-- ARGV[7]  the chunk KEYS[3..4] are for: the id's (id_chunk), or what a refusal answered
--
-- Returns {http_status, payload_json, changed}:
--   200, order fields (strings), 1|0   cancelled now | was already cancelled
--   404, {code="order_not_found"}      missing, or not the requester's
--   409, {code="order_<status>"}       not open, e.g. order_completed; nothing written
--   409, {code="order_owner_changed"}  the caller's keys do not fit; nothing written
--   409, {code="balance_limit", balance_cents, limit}  nothing written
--   409, {code="order_chunk_moved", chunk}  the order's chunk (chunk) is neither ARGV[7] nor the next:
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
if owner ~= ARGV[1] then
  return {409, cjson.encode({code = 'order_owner_changed'}), 0}
end
if status == STATUS.cancelled then
  return {200, cjson.encode(order_map(KEYS[1])), 0}
end
if status ~= STATUS.open then
  return {409, cjson.encode({code = 'order_' .. status}), 0}
end
local balance = redis.call('HGET', KEYS[2], 'balance_cents') or '0'
if tonumber(balance) + tonumber(total) > tonumber(ARGV[5]) then
  return {409, cjson.encode({code = 'balance_limit', balance_cents = balance, limit = ARGV[5]}), 0}
end

-- The order is in its id's chunk or the chunk its hash says (app/keys.py); the keys are
-- for ARGV[7] and the one after it (a place that met a rollover on its way).
local chunk, lists = chunk_lists(chunk_field, order_id, ARGV[7], {KEYS[3], KEYS[4]}, {KEYS[15], KEYS[16]})
if not lists then
  return {409, cjson.encode({code = 'order_chunk_moved', chunk = chunk}), 0}
end
local from, to = lists[1], lists[2]

-- Every check passed: write.
local units = 0
for _, quantity in decode_items(items) do
  units = units + tonumber(quantity)
end
redis.call('HINCRBY', KEYS[2], 'balance_cents', total)
redis.call('HSET', KEYS[1], ORDER_FIELD.status, STATUS.cancelled)
chunk_leave(from, KEYS[10], KEYS[12], chunk, order_id)
chunk_enter(to, KEYS[11], KEYS[13], KEYS[14], chunk, seq, order_id)
redis.call('ZREM', KEYS[5], order_id)
redis.call('ZADD', KEYS[6], seq, order_id)
redis.call('ZADD', KEYS[9], ARGV[6], order_id)
redis.call('HINCRBY', KEYS[8], 'open_cents', -tonumber(total))
redis.call('HINCRBY', KEYS[8], 'balance_cents', total)
redis.call('HINCRBY', KEYS[8], 'open_units', -units)
redis.call('HINCRBY', KEYS[8], 'orders_open', -1)
redis.call('HINCRBY', KEYS[8], 'orders_cancelled', 1)
redis.call('HINCRBY', KEYS[8], 'changes', 1)
redis.call('XADD', KEYS[7], '*', 'type', ORDER_EVENT.cancelled, 'order_id', order_id,
  'customer_id', owner, 'status', STATUS.cancelled, 'request_id', ARGV[4], 'at', ARGV[3])
return {200, cjson.encode(order_map(KEYS[1])), 1}
