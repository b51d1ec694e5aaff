-- order_from_stripe (PROTOTYPE for loadtests/escrow_probe.py, not an app script): an order
-- placed from stripes (docs/escrow.md): the customer's partition P does the commit's
-- work (commit_order.lua: abort marker, a run that already happened, Idempotency-Key,
-- customer, balance, chunk; then the debit, the order, its indexes, its events, the
-- ledger, the key's answer), and each line's units come from the stripe of its phone in
-- the stripe host partition S (one node serves P and S: on a cluster the app sends it
-- in the across_slots form, app/lua_prelude.py), instead of from the phone's stock.
-- A stripe that is missing or short answers stripe_short with NOTHING written (no
-- Idempotency-Key record either): the app then places the order by the split saga.
-- Nothing is written before the last check.
--
-- KEYS[1..8]   new_order_keys (app/orders/service.py): c{P}, newest i{P}, o{P}, os{P} chunk,
--              co{P}, oq{P}, e{P}, lg{P}
-- KEYS[9..12]  chunk_entry_keys: od{P}, on{P}, ok{P}, the next chunk's os{P}
-- KEYS[13]     ab{P}  the abort markers (a saga attempt of this order id that aborted)
-- KEYS[14..13+n]     sq{S}<phone_id>, the stripe of each line's phone (prototype key)
-- KEYS[14+n..13+2n]  lg{S} of each line's stripe host (may repeat)
-- KEYS[14+2n]  the older Idempotency-Key bucket
-- ARGV[1..8]   as place_order.lua: order id, customer id, now, request id, autocheck,
--              key given, the record field + fingerprint, the newest bucket's expiry
-- ARGV[9]      S, the stripe host partition (kept in the order hash: a cancel gives the
--              units back to that stripe)
-- ARGV[10..9+2n]  phone_id, quantity for each line
--
-- Returns {http_status, payload_json, replayed} as commit_order.lua, and
--   409, {code="stripe_short", phone_ids=[...]}, 0    nothing written

local function fmt(n)
  return string.format('%d', n)
end

local n = (#ARGV - 9) / 2
if n < 1 or n ~= math.floor(n) or #KEYS ~= 14 + 2 * n then
  return redis.error_reply('order_from_stripe: ' .. #KEYS .. ' keys do not fit ' .. #ARGV .. ' arguments')
end
local order_id = ARGV[1]
local use_idem = ARGV[6] == '1'

local marker = redis.call('HGET', KEYS[13], order_id)
if marker then
  return {503, cjson.encode({code = 'service_unavailable'}), 0}
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {201, cjson.encode(order_map(KEYS[3])), 0}
end
if use_idem then
  local same_body, status, body = find_record(record_buckets(KEYS, 2), ARGV[7])
  if same_body ~= nil then
    if not same_body then
      return {422, cjson.encode({code = 'idempotency_key_reused'}), 0}
    end
    return replay_reply(status, body)
  end
end

-- The stripes first: a short one is not an answer (the saga gives it), so it must come
-- before any refusal that stores the key's record.
local short, prices, total, units = {}, {}, 0, 0
for i = 1, n do
  local quantity = tonumber(ARGV[9 + 2 * i])
  local row = redis.call('HMGET', KEYS[13 + i], 'price_cents', 'stock')
  if not row[1] or tonumber(row[2]) < quantity then
    short[#short + 1] = ARGV[8 + 2 * i]
  else
    prices[i] = tonumber(row[1])
    total = total + prices[i] * quantity
    units = units + quantity
  end
end
if #short > 0 then
  return {409, cjson.encode({code = 'stripe_short', phone_ids = short}), 0}
end

local function answer(status, payload)
  local encoded = cjson.encode(payload)
  if use_idem then
    store_record(KEYS[2], ARGV[7], status, status == 201 and payload.id or encoded, ARGV[8])
  end
  return {status, encoded, 0}
end

local balance = redis.call('HGET', KEYS[1], 'balance_cents')
if not balance then
  return answer(404, {code = 'customer_not_found'})
end
balance = tonumber(balance)
if balance < total then
  return answer(402, {code = 'insufficient_funds', balance_cents = fmt(balance), total_cents = fmt(total)})
end

local chunk = id_chunk(order_id)
local list, current, placed, last = placing_chunk(KEYS[6], chunk, KEYS[4], KEYS[12])
if not list then
  return {409, cjson.encode({code = 'order_chunk_stale', chunk = fmt(current)}), 0}
end

-- Every check passed: write.
local items = {}
local moved = {[KEYS[8]] = true}
for i = 1, n do
  local quantity = tonumber(ARGV[9 + 2 * i])
  redis.call('HINCRBY', KEYS[13 + i], 'stock', -quantity)
  redis.call('HINCRBY', KEYS[13 + i], 'sold', quantity)
  local ledger = KEYS[13 + n + i]
  redis.call('HINCRBY', ledger, 'stripe_units', -quantity)
  redis.call('HINCRBY', ledger, 'stripe_sold_units', quantity)
  if not moved[ledger] then
    moved[ledger] = true
    redis.call('HINCRBY', ledger, 'changes', 1)
  end
  items[i] = encode_item(ARGV[8 + 2 * i], fmt(quantity), fmt(prices[i]))
end
redis.call('HINCRBY', KEYS[1], 'balance_cents', -total)
local status = STATUS.open
if ARGV[5] == '1' then
  status = STATUS.completed
end
local seq, after = next_order_seq(KEYS[6], KEYS[11], last, current, placed)
local order = {
  id = order_id,
  customer_id = ARGV[2],
  status = status,
  items = encode_items(items),
  total_cents = fmt(total),
  seq = seq,
  created_at = fmt(math.floor(tonumber(seq) / 1000)),
}
redis.call('HSET', KEYS[3], ORDER_FIELD.customer_id, order.customer_id, ORDER_FIELD.status, status,
  ORDER_FIELD.items, order.items, ORDER_FIELD.seq, order.seq, 'v', ARGV[9])
local chunk_name = fmt(current)
if current ~= chunk then
  redis.call('HSET', KEYS[3], ORDER_FIELD.chunk, chunk_name)
end
chunk_enter(list, KEYS[9], KEYS[10], KEYS[11], chunk_name, seq, order_id)
redis.call('ZADD', KEYS[5], seq, order_id)
redis.call('HINCRBY', KEYS[8], 'balance_cents', -total)
redis.call('HINCRBY', KEYS[8], status .. '_cents', total)
redis.call('HINCRBY', KEYS[8], status .. '_units', units)
redis.call('HINCRBY', KEYS[8], 'orders_' .. status, 1)
redis.call('HINCRBY', KEYS[8], 'changes', 1)

redis.call('XADD', KEYS[7], '*', 'type', ORDER_EVENT.open, 'order_id', order_id,
  'customer_id', ARGV[2], 'status', STATUS.open, 'request_id', ARGV[4], 'at', ARGV[3])
if status == STATUS.completed then
  redis.call('XADD', KEYS[7], '*', 'type', ORDER_EVENT.completed, 'order_id', order_id,
    'customer_id', ARGV[2], 'status', STATUS.completed, 'request_id', ARGV[4], 'at', ARGV[3],
    'balance_cents', fmt(balance - total))
end
order.current_chunk = fmt(after)
return answer(201, order)
