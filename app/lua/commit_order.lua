#!lua
-- commit_order: the saga's commit point, on the customer's partition P (docs/data-tier.md,
-- 3.1 step 2). The stock is already held by reserve_stock on each phone's partition, with
-- the unit prices the reserves read; this checks, in this order, the abort marker, a
-- commit that already ran, the Idempotency-Key record, the customer and the balance, then
-- debits, stores and indexes the order, appends its events, moves the customer side of
-- the ledger and stores the key's answer. Nothing is written before the last check but
-- the refusal itself: any refusal writes the abort marker ab{P}[order id] (and the key's
-- record, as place_order does), so a late or retried commit answers the same and the
-- settler releases the stock.
-- Idempotent by order id: a second run finds the order (answers it) or the marker
-- (answers the stored refusal).
-- Refused (and marked) past the reservation's expiry by Redis TIME: the settler may have
-- released the stock by then, and the marker is pruned after its keep-until time, when
-- the expiry alone refuses the order (docs/data-tier.md, 3.2).
--
-- Key names: app/keys.py; every key is in P.
-- KEYS[1]  c{P}<customer_id>                 hash
-- KEYS[2]  i{P}<bucket>                     hash, the newest Idempotency-Key bucket (a new
--          record goes here; all of them ignored unless ARGV[6] == "1")
-- KEYS[3]  o{P}<order_id>                    hash
-- KEYS[4]  os{P}<status>:<k>                 zset, the partition's orders of the new order's
--          status placed in chunk k = ARGV[12], by seq (no all-orders index: lists merge
--          the statuses')
-- KEYS[5]  co{P}<customer_id>:<status>       zset, the customer's, the same
-- KEYS[6]  oq{P}                             string, the partition's order clock and chunk
--          state "<seq> <k> <n>": the last seq given, the current chunk k, the orders placed
--          in it n (docs/data-tier.md 10.2)
-- KEYS[7]  e{P}                              the partition's events stream
-- KEYS[8]  lg{P}, the customer partition's ledger   hash (balance_cents, <status>_cents and _units,
--          orders_<status>, changes; the units' stock side moves on the phones' partitions)
-- KEYS[9]  ab{P}                             hash: order id -> refusal (the abort markers)
-- KEYS[10] ad{P}                             zset: order id by when its marker may be pruned
-- KEYS[11] od{P}<status>                     zset, the status's non-empty chunks
-- KEYS[12] on{P}<status>                     hash, the status's orders per chunk, group
-- KEYS[13] ok{P}                             hash, each chunk's start seq
-- KEYS[14] os{P}<status>:<k+1>               zset, the next chunk's: where the order goes
--          when the chunk moved on just before it
-- KEYS[15]    i{P}<bucket>                  the older Idempotency-Key bucket (the window before KEYS[2]'s)
-- ARGV[1]  order id (minted in the customer's partition)
-- ARGV[2]  customer id
-- ARGV[3]  now, ms since the epoch
-- ARGV[4]  request id (carried into the events only: the order never answers it)
-- ARGV[5]  "1" autocheck (complete at once) or "0" (stay open)
-- ARGV[6]  "1" when an Idempotency-Key was given, else "0"
-- ARGV[7]  the key's record field (16 bytes) then the request's fingerprint (12
--          bytes of the canonical body's sha256): app/orders/idempotency.py
-- ARGV[8]  when KEYS[2] expires, Unix seconds (app/orders/idempotency.py)
-- ARGV[9]  the order's items "phone_id:quantity:unit_price_cents;..." in the request's
--          line order, with the prices the reserves answered (the app relays them)
-- ARGV[10] the reservations' expiry, ms since the epoch (what the reserves were given)
-- ARGV[11] keep-until of a marker written now, ms since the epoch (app/orders/saga.py)
-- ARGV[12] the chunk KEYS[4] is for: the id's (id_chunk), or the current one a refusal
--          below answered (the id, already in the reservations, is kept; the order
--          hash's chunk field then says where it is)
--
-- Returns {http_status, payload_json, replayed}:
--   201, order fields (all strings), 0            committed now (with current_chunk: the
--                                                 partition's after it), or by an earlier run;
--                                                 with a `stripe` field when the order was
--                                                 sold from stripes (place_from_stripe.lua):
--                                                 the app then releases its reservations
--                                                 instead of settling them as sold
--   409, {code="order_chunk_stale", chunk}, 0     the partition's current chunk (chunk) is
--                                                 neither ARGV[12] nor the next: nothing
--                                                 written, not even a marker; the app
--                                                 retries with chunk's keys
--   404, {code="customer_not_found"}, 0           marker written
--   402, {code="insufficient_funds", balance_cents, total_cents}, 0   marker written
--   422, {code="idempotency_key_reused"}, 0       same key, other body; marker written
--   201, {replay_of=order id}, 1 or a stored refusal, 1
--                                                 the key's first answer, replayed (this
--                                                 order id is aborted: marker written; the
--                                                 app rebuilds a 201 from the order)
--   the stored refusal, 0                         the order id was aborted before (by a
--                                                 refusal, or by the settler's fence:
--                                                 503 {code="service_unavailable"})
--   503, {code="service_unavailable"}, 0          past the expiry; marker written
--   error reply "commit_order: ..."               bad items; nothing written
--
-- decode_items, order_map, now_ms, record_buckets, find_record, replay_reply, recorded_answer,
-- placing_chunk and enter_order (the order's writes, shared with place_order and
-- place_from_stripe): the prelude (app/lua_prelude.py).

if #KEYS ~= 15 then
  return redis.error_reply('commit_order: expected 15 keys, got ' .. #KEYS)
end
local order_id = ARGV[1]
local use_idem = ARGV[6] == '1'

-- The abort marker holds "<status> <payload_json>", "swept" from the settler's fence, or
-- "replayed" when the key's record answered instead (answered again below).
local marker = redis.call('HGET', KEYS[9], order_id)
if marker == 'swept' then
  return {503, cjson.encode({code = 'service_unavailable'}), 0}
end
if marker and marker ~= 'replayed' then
  local space = string.find(marker, ' ', 1, true)
  return {tonumber(string.sub(marker, 1, space - 1)), string.sub(marker, space + 1), 0}
end
if not marker and redis.call('EXISTS', KEYS[3]) == 1 then
  return {201, cjson.encode(order_map(KEYS[3])), 0}
end

local function mark(value)
  redis.call('HSET', KEYS[9], order_id, value)
  redis.call('ZADD', KEYS[10], 'GT', ARGV[11], order_id)
end

local function abort(status, encoded, replayed)
  mark(status .. ' ' .. encoded)
  return {status, encoded, replayed}
end

if use_idem then
  local same_body, status, body = find_record(record_buckets(KEYS, 2), ARGV[7])
  if same_body ~= nil then
    if not same_body then
      return abort(422, cjson.encode({code = 'idempotency_key_reused'}), 0)
    end
    -- The replay names another order (or a refusal): this order id never commits.
    mark('replayed')
    return replay_reply(status, body)
  end
end
if marker then
  -- Replayed before, and the key's record has expired since: still never commit.
  return {503, cjson.encode({code = 'service_unavailable'}), 0}
end
-- Past the expiry the settler may have released the stock: never commit (a replay above
-- commits nothing, so it is still answered).
if now_ms() > tonumber(ARGV[10]) then
  return abort(503, cjson.encode({code = 'service_unavailable'}), 0)
end

local function answer(status, payload)
  local encoded = recorded_answer(KEYS[2], use_idem and ARGV[7], ARGV[8], status, payload)
  if status >= 400 then
    return abort(status, encoded, 0)
  end
  return {status, encoded, 0}
end

local total, units, lines = 0, 0, 0
for _, quantity, unit_price in decode_items(ARGV[9]) do
  total = total + tonumber(quantity) * tonumber(unit_price)
  units = units + tonumber(quantity)
  lines = lines + 1
end
if lines == 0 then
  return redis.error_reply('commit_order: no items')
end
-- Every customer hash has balance_cents (create_customer.lua): one read, not EXISTS + HGET.
local balance = redis.call('HGET', KEYS[1], 'balance_cents')
if not balance then
  return answer(404, {code = 'customer_not_found'})
end
balance = tonumber(balance)
local function fmt(n)
  return string.format('%d', n)
end
if balance < total then
  return answer(402, {code = 'insufficient_funds', balance_cents = fmt(balance), total_cents = fmt(total)})
end

-- Orders enter only the partition's current chunk (a chunk's seqs all precede the next
-- one's): KEYS[4]'s, or KEYS[14]'s when the chunk moved on just before. After every
-- refusal, which answers whatever the chunk.
local list, current, placed, last = placing_chunk(KEYS[6], tonumber(ARGV[12]), KEYS[4], KEYS[14])
if not list then
  return {409, cjson.encode({code = 'order_chunk_stale', chunk = fmt(current)}), 0}
end

-- Every check passed: write (the debit, the order, its indexes, ledger and events).
local order = enter_order(KEYS[1], KEYS[3], KEYS[5], KEYS[6], KEYS[13], KEYS[11], KEYS[12],
  KEYS[7], KEYS[8], order_id, ARGV[2], ARGV[9], total, units, balance, ARGV[5] == '1', ARGV[3],
  ARGV[4], list, current, placed, last)
return answer(201, order)
