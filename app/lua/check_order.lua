-- check_order: move an open order to completed, move its amount and units
-- from open to completed in the ledger, and append order.completed.
-- Checking a completed order again changes nothing; one in any other status
-- (cancelled today) is refused with that status.
--
-- Key names: app/keys.py; P is the order's (and its owner's) partition, and
-- every key is in it.
--
-- KEYS[1]  o{P}<order_id>                    hash
-- KEYS[2]  os{P}open:<k>                     zset, chunk k = ARGV[5] (docs/data-tier.md 10.2)
-- KEYS[3]  os{P}completed:<k>                zset
-- KEYS[4]  co{P}<owner_id>:open              zset
-- KEYS[5]  co{P}<owner_id>:completed         zset
-- KEYS[6]  e{P}                              the order partition's events stream
-- KEYS[7]  c{P}<owner_id>                    hash (read: the balance for the mail)
-- KEYS[8]  lg{P}                             hash, the running totals
-- KEYS[9]  od{P}open, KEYS[10] od{P}completed     zsets, the statuses' non-empty chunks
-- KEYS[11] on{P}open, KEYS[12] on{P}completed     hashes, their orders per chunk, group
-- KEYS[13] ok{P}                             hash, read: the chunks' starts
-- KEYS[14] os{P}open:<k+1>, KEYS[15] os{P}completed:<k+1>   zsets, the next chunk's
-- ARGV[1]  owner id the keys above were built for
-- ARGV[2]  requesting customer id, or "" for the admin
-- ARGV[3]  now, ms since the epoch
-- ARGV[4]  request id (carried into the event)
-- ARGV[5]  the chunk KEYS[2..3] are for: the id's (id_chunk), or what a refusal answered
--
-- Returns {http_status, payload_json, changed}:
--   200, order fields (strings), 1|0   completed now | was already completed
--   404, {code="order_not_found"}      missing, or not the requester's
--   409, {code="order_<status>"}       not open, e.g. order_cancelled; nothing written
--   409, {code="order_owner_changed"}  the caller's keys do not fit; nothing written
--   409, {code="order_chunk_moved", chunk}  the order's chunk (chunk) is neither ARGV[5] nor the next:
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

if status == STATUS.completed then
  return {200, cjson.encode(order_map(KEYS[1])), 0}
end
if status ~= STATUS.open then
  -- Only an open order can be completed; any other is refused by its status.
  return {409, cjson.encode({code = 'order_' .. status}), 0}
end

-- The order is in its id's chunk or the chunk its hash says (app/keys.py); the keys are
-- for ARGV[5] and the one after it (a place that met a rollover on its way).
local chunk, lists = chunk_lists(chunk_field, order_id, ARGV[5], {KEYS[2], KEYS[3]}, {KEYS[14], KEYS[15]})
if not lists then
  return {409, cjson.encode({code = 'order_chunk_moved', chunk = chunk}), 0}
end
local from, to = lists[1], lists[2]

local units = 0
for _, quantity in decode_items(items) do
  units = units + tonumber(quantity)
end
redis.call('HSET', KEYS[1], ORDER_FIELD.status, STATUS.completed)
chunk_leave(from, KEYS[9], KEYS[11], chunk, order_id)
chunk_enter(to, KEYS[10], KEYS[12], KEYS[13], chunk, seq, order_id)
redis.call('ZREM', KEYS[4], order_id)
redis.call('ZADD', KEYS[5], seq, order_id)
redis.call('HINCRBY', KEYS[8], 'open_cents', -tonumber(total))
redis.call('HINCRBY', KEYS[8], 'completed_cents', total)
redis.call('HINCRBY', KEYS[8], 'open_units', -units)
redis.call('HINCRBY', KEYS[8], 'completed_units', units)
redis.call('HINCRBY', KEYS[8], 'orders_open', -1)
redis.call('HINCRBY', KEYS[8], 'orders_completed', 1)
redis.call('HINCRBY', KEYS[8], 'changes', 1)
redis.call('XADD', KEYS[6], '*', 'type', ORDER_EVENT.completed, 'order_id', order_id,
  'customer_id', owner, 'status', STATUS.completed, 'request_id', ARGV[4], 'at', ARGV[3],
  'balance_cents', redis.call('HGET', KEYS[7], 'balance_cents'))
return {200, cjson.encode(order_map(KEYS[1])), 1}
