-- place_order: validate every line, stock and the balance, then (only then)
-- move stock to sold, debit the customer, store and index the order and append
-- its events, and move the ledgers' running totals. Redis never rolls back a
-- half-run script, so no write happens before the last check.
--
-- Key names: app/keys.py. P is the customer's partition (the order id was
-- minted in it); each phone's partition Q may be another one: this script and
-- cancel_order are the reservation saga collapsed (docs/data-tier.md, 3.9), run
-- only where one node serves P and every Q (app/lua_prelude.py: across_slots).
--
-- The 409 rule (docs/escrow.md, section 5): a short line is out_of_stock only when its
-- phone has no units lent to stripes (`lent` absent or 0). With lent > 0 the script
-- answers stock_lent and writes nothing, not even the Idempotency-Key's record: the app
-- drains the phone and recalls its stripes (app/orders/recall.py), then sends the order
-- again, which must not find a refusal stored.
--
-- KEYS[1]  c{P}<customer_id>                   hash
-- KEYS[2]  i{P}<bucket>                       hash, the newest Idempotency-Key bucket (a
--          new record goes here; all of them ignored unless ARGV[6] == "1")
-- KEYS[3]  o{P}<order_id>                      hash, must not exist
-- KEYS[4]  os{P}<status>:<k>                   zset, the partition's orders of the new
--          order's status placed in chunk k, the one the order id says (id_chunk), by
--          seq (no all-orders index: lists merge the statuses')
-- KEYS[5]  co{P}<customer_id>:<status>         zset, the customer's, the same
-- KEYS[6]  oq{P}                               string, the partition's order clock and chunk
--          state "<seq> <k> <n>": the last seq given, the current chunk k, the orders
--          placed in it n (docs/data-tier.md 10.2)
-- KEYS[7]  e{P}                                the order partition's events stream
-- KEYS[8]  lg{P}                               hash, the customer side's running totals
-- KEYS[9]  od{P}<status>                       zset, the status's non-empty chunks
-- KEYS[10] on{P}<status>                       hash, the status's orders per chunk, group
-- KEYS[11] ok{P}                               hash, each chunk's start seq
-- KEYS[12] os{P}<status>:<k+1>                 zset, the next chunk's: where the order goes
--          when the chunk moved on just before it (its hash then says the chunk)
-- KEYS[13..12+n]  p{Q}<phone_id>, one per line, same order as the lines
-- KEYS[13+n..12+2n]  lg{Q} of each line's phone, same order (may repeat)
-- KEYS[13+2n]  i{P}<bucket>, the older Idempotency-Key bucket (the window before KEYS[2]'s)
-- ARGV[1]  order id
-- ARGV[2]  customer id
-- ARGV[3]  now, ms since the epoch
-- ARGV[4]  request id (carried into the events only: the order never answers it)
-- ARGV[5]  "1" autocheck (complete at once) or "0" (stay open)
-- ARGV[6]  "1" when an Idempotency-Key was given, else "0"
-- ARGV[7]  the key's record field (16 bytes) then the request's fingerprint (12
--          bytes of the canonical body's sha256): app/orders/idempotency.py
-- ARGV[8]  when KEYS[2] expires, Unix seconds (app/orders/idempotency.py)
-- ARGV[9..8+2n]  phone_id, quantity for each line (quantities 1..100, checked
--                by the caller; phone ids distinct)
--
-- Returns {http_status, payload_json, replayed}:
--   201, order fields (all strings) and current_chunk, 0   the order was placed;
--                                                 current_chunk: the partition's after it
--   409, {code="order_chunk_stale", chunk}, 0    the partition's current chunk (chunk) is
--                                                 neither the id's nor the next: nothing
--                                                 written; the app mints an id for chunk
--   201, {replay_of=order id}, 1                  the key's order, replayed (the app
--                                                 rebuilds the first answer from it)
--   404, {code="customer_not_found"}              nothing written
--   404, {code="phone_not_found", phone_ids=[]}   nothing written
--   409, {code="out_of_stock", lines=[...]}       nothing written (every short line's
--                                                 phone has lent = 0)
--   409, {code="stock_lent", phone_ids=[]}, 0     short lines whose phones have units
--                                                 lent out: nothing written, no record
--   402, {code="insufficient_funds", balance_cents, total_cents}
--   422, {code="idempotency_key_reused"}          same key, other body
--   stored status and payload, 1                  the key's refusal, replayed
--   error reply "place_order: ..."               KEYS do not fit ARGV; nothing written
--
-- encode_item(s), record_buckets, recorded_reply, recorded_answer, id_chunk, placing_chunk and
-- enter_order (the order's writes, shared with commit_order and place_from_stripe): the
-- prelude (app/lua_prelude.py).

local function fmt(n)
  return string.format('%d', n)
end

local n = (#ARGV - 8) / 2
if #KEYS ~= 13 + 2 * n then
  return redis.error_reply('place_order: expected ' .. (13 + 2 * n) .. ' keys, got ' .. #KEYS)
end

local request = ARGV[6] == '1' and ARGV[7]
if request then
  local replay = recorded_reply(record_buckets(KEYS, 2), request)
  if replay then
    return replay
  end
end

local function answer(status, payload)
  return {status, recorded_answer(KEYS[2], request, ARGV[8], status, payload), 0}
end

-- Every customer hash has balance_cents (create_customer.lua), so its absence is the
-- customer's: one read where EXISTS then HGET were two (the script is atomic, so
-- reading it before the phones' checks changes nothing).
local balance = redis.call('HGET', KEYS[1], 'balance_cents')
if not balance then
  return answer(404, {code = 'customer_not_found'})
end
balance = tonumber(balance)
if redis.call('EXISTS', KEYS[3]) == 1 then
  -- 96 random bits make this unreachable; refuse rather than overwrite.
  return {500, cjson.encode({code = 'order_id_collision'}), 0}
end

local missing = {}
local short = {}
local lent = {}
local prices = {}
local total = 0
for i = 1, n do
  local phone_id = ARGV[7 + 2 * i]
  local quantity = tonumber(ARGV[8 + 2 * i])
  local row = redis.call('HMGET', KEYS[12 + i], 'price_cents', 'stock')
  if not row[1] then
    missing[#missing + 1] = phone_id
  else
    local stock = tonumber(row[2])
    if stock < quantity then
      short_line(KEYS[12 + i], phone_id, fmt(quantity), fmt(stock), lent, short)
    end
    prices[i] = tonumber(row[1])
    total = total + prices[i] * quantity
  end
end
if #missing > 0 then
  return answer(404, {code = 'phone_not_found', phone_ids = missing})
end
if #lent > 0 then
  return {409, cjson.encode({code = 'stock_lent', phone_ids = lent}), 0}
end
if #short > 0 then
  return answer(409, {code = 'out_of_stock', lines = short})
end
if balance < total then
  return answer(402, {code = 'insufficient_funds', balance_cents = fmt(balance), total_cents = fmt(total)})
end

-- Orders enter only the partition's current chunk (so a chunk's seqs all precede the
-- next one's): the id's (KEYS[4]), or the next one (KEYS[12]) when the chunk moved on
-- while the order was on its way (requests in flight at a rollover would otherwise all
-- go round again). Any other is refused before any write (a replay above answers
-- whatever its chunk).
local chunk = id_chunk(ARGV[1])
local list, current, placed, last = placing_chunk(KEYS[6], chunk, KEYS[4], KEYS[12])
if not list then
  return {409, cjson.encode({code = 'order_chunk_stale', chunk = fmt(current)}), 0}
end

-- Every check passed: write. The phone side: each line's units from stock to sold (as
-- the split saga's settle does: its give-back, return_stock, takes units from sold), and
-- each phone ledger's `changes` once, however many lines it has.
local items = {}
local units = 0
local moved = {[KEYS[8]] = true}
for i = 1, n do
  local phone_id = ARGV[7 + 2 * i]
  local quantity = tonumber(ARGV[8 + 2 * i])
  redis.call('HINCRBY', KEYS[12 + i], 'stock', -quantity)
  redis.call('HINCRBY', KEYS[12 + i], 'sold', quantity)
  local ledger = KEYS[12 + n + i]
  redis.call('HINCRBY', ledger, 'stock_units', -quantity)
  redis.call('HINCRBY', ledger, 'sold_units', quantity)
  if not moved[ledger] then
    moved[ledger] = true
    redis.call('HINCRBY', ledger, 'changes', 1)
  end
  units = units + quantity
  items[i] = encode_item(phone_id, fmt(quantity), fmt(prices[i]))
end
-- The customer's side (the debit, the order, its indexes, ledger and events).
local order = enter_order(KEYS[1], KEYS[3], KEYS[5], KEYS[6], KEYS[11], KEYS[9], KEYS[10],
  KEYS[7], KEYS[8], ARGV[1], ARGV[2], encode_items(items), total, units, balance, ARGV[5] == '1',
  ARGV[3], ARGV[4], list, current, placed, last)
return answer(201, order)
