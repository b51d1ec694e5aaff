-- place_from_stripe: an order sold from stripes (docs/escrow.md, section 3), one script on
-- the customer's primary: the customer's partition P does commit_order's work (the order,
-- the debit, its indexes, events and ledger: the prelude's enter_order, as place_order and
-- commit_order) and each line's units come from its phone's stripe on the host partition
-- S of that primary (app/keys.py: stripe), instead of from the phone's pool. Where S != P
-- the app sends it in the across_slots form (app/lua_prelude.py): the host's keys are
-- undeclared and touched first, so a node that no longer serves S refuses it before any
-- write (NotOnOneNode) and the order goes on by the split saga with the same id.
--
-- Checks, in this order, every one before any write:
--   the answers that write nothing: an abort marker for this id (a saga of this id
--   aborted: never place it), the order already there (a run whose answer was lost:
--   answered again, even though it emptied the stripe since), the Idempotency-Key's
--   record (replayed, or 422 for another body);
--   the stripes: a missing, closed or short stripe, or stripes of the lines at different
--   epochs (the order keeps one mark), answer stripe_short with NOTHING written, not even
--   the key's record: the split saga answers the request (the pools may still have
--   units);
--   then, as commit_order, the customer and the balance (refusals stored as the key's
--   record, as place_order does) and the status chunk (stale: nothing written).
-- Then it writes: per line, the stripe's stock -q and sold +q; the host ledger's
-- stripe_units -units and stripe_sold_units +units (its changes once); the order with its
-- stripe mark (ORDER_FIELD.stripe = "<S>:<epoch>": where a cancel gives the units back).
-- The unit price is the stripe's.
--
-- Key names: app/keys.py.
-- KEYS[1..8]  new_order_keys (app/orders/service.py), all of P: c{P}<customer>, the newest
--             i{P}<bucket>, o{P}<order id>, os{P}<status>:<k>, co{P}<customer>:<status>,
--             oq{P} (the order clock), e{P}, lg{P}
-- KEYS[9]     ab{P}    hash: order id -> abort marker (a saga of this id that aborted)
-- KEYS[10..13] chunk_entry_keys: od{P}<status>, on{P}<status>, ok{P}, os{P}<status>:<k+1>
-- KEYS[14]    lg{S}    hash, the host partition's ledger (stripe_units, stripe_sold_units,
--                      changes); lg{P} itself when S = P
-- KEYS[15..14+n]  sq{S}<phone_id> of each line, in the lines' order
-- KEYS[15+n]  i{P}<bucket>, the older Idempotency-Key bucket
-- ARGV[1..8]  as place_order.lua: order id (minted in P), customer id, now (ms), request
--             id, "1" autocheck, "1" key given, the record field + fingerprint, the
--             newest bucket's expiry (Unix seconds)
-- ARGV[9]     S, the host partition (a number)
-- ARGV[10..9+2n]  phone_id, quantity for each line (quantities 1..100, phone ids
--             distinct: checked by the caller)
--
-- Returns {http_status, payload_json, replayed}:
--   201, order fields (strings, with stripe and current_chunk) and stripe_left
--        {phone_id = the stripe's stock after this order}, 0        placed now
--   201, order fields, 0                                  the order was there (no
--                                                         stripe_left)
--   409, {code="stripe_short", phone_ids=[...]}, 0        nothing written; with
--        closed=[...] when some of those stripes are closed (their phone is being
--        recalled: the app stops trying its stripes until a receipt)
--   409, {code="order_chunk_stale", chunk}, 0             nothing written; the app mints
--                                                         an id for chunk
--   503, {code="service_unavailable"}, 0                  this id was aborted by a saga
--                                                         run: nothing written
--   201, {replay_of=order id}, 1 / stored refusal, 1      the key's first answer
--   422, {code="idempotency_key_reused"}, 0               same key, other body
--   404, {code="customer_not_found"}, 0                   stored as the key's record
--   402, {code="insufficient_funds", balance_cents, total_cents}, 0   the same
--   error reply "place_from_stripe: ..."                  KEYS do not fit ARGV
--
-- order_map, record_buckets, recorded_reply, recorded_answer, store_record, encode_item(s),
-- stripe_mark, id_chunk, placing_chunk, enter_order: the prelude (app/lua_prelude.py).

local function fmt(n)
  return string.format('%d', n)
end

local n = (#ARGV - 9) / 2
if n < 1 or n ~= math.floor(n) or #KEYS ~= 15 + n then
  return redis.error_reply('place_from_stripe: ' .. #KEYS .. ' keys do not fit ' .. #ARGV .. ' arguments')
end
local order_id = ARGV[1]
local request = ARGV[6] == '1' and ARGV[7]

if redis.call('HEXISTS', KEYS[9], order_id) == 1 then
  return {503, cjson.encode({code = 'service_unavailable'}), 0}
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {201, cjson.encode(order_map(KEYS[3])), 0}
end
if request then
  local replay = recorded_reply(record_buckets(KEYS, 2), request)
  if replay then
    return replay
  end
end

-- The stripes, before any refusal that stores the key's record: a short one is not an
-- answer (the saga gives it).
local short, closed, prices, total, units, epoch = {}, {}, {}, 0, 0, nil
for i = 1, n do
  local quantity = tonumber(ARGV[9 + 2 * i])
  local row = redis.call('HMGET', KEYS[14 + i], 'price_cents', 'stock', 'epoch', 'closed')
  if row[4] then
    short[#short + 1] = ARGV[8 + 2 * i]
    closed[#closed + 1] = ARGV[8 + 2 * i]
  elseif not row[1] or not row[3] or tonumber(row[2] or '0') < quantity
      or (epoch and row[3] ~= epoch) then
    short[#short + 1] = ARGV[8 + 2 * i]
  else
    epoch = row[3]
    prices[i] = tonumber(row[1])
    total = total + prices[i] * quantity
    units = units + quantity
  end
end
if #closed > 0 then
  return {409, cjson.encode({code = 'stripe_short', phone_ids = short, closed = closed}), 0}
elseif #short > 0 then
  return {409, cjson.encode({code = 'stripe_short', phone_ids = short}), 0}
end

local function answer(status, payload)
  return {status, recorded_answer(KEYS[2], request, ARGV[8], status, payload), 0}
end

local balance = redis.call('HGET', KEYS[1], 'balance_cents')
if not balance then
  return answer(404, {code = 'customer_not_found'})
end
balance = tonumber(balance)
if balance < total then
  return answer(402, {code = 'insufficient_funds', balance_cents = fmt(balance), total_cents = fmt(total)})
end

local list, current, placed, last = placing_chunk(KEYS[6], id_chunk(order_id), KEYS[4], KEYS[13])
if not list then
  return {409, cjson.encode({code = 'order_chunk_stale', chunk = fmt(current)}), 0}
end

-- Every check passed: write. The host's side first.
local items, left = {}, {}
for i = 1, n do
  local phone_id = ARGV[8 + 2 * i]
  local quantity = tonumber(ARGV[9 + 2 * i])
  left[phone_id] = fmt(redis.call('HINCRBY', KEYS[14 + i], 'stock', -quantity))
  redis.call('HINCRBY', KEYS[14 + i], 'sold', quantity)
  items[i] = encode_item(phone_id, fmt(quantity), fmt(prices[i]))
end
redis.call('HINCRBY', KEYS[14], 'stripe_units', -units)
redis.call('HINCRBY', KEYS[14], 'stripe_sold_units', units)
if KEYS[14] ~= KEYS[8] then
  redis.call('HINCRBY', KEYS[14], 'changes', 1)  -- enter_order counts lg{P}'s
end
local mark = stripe_mark(ARGV[9], epoch)
local order = enter_order(KEYS[1], KEYS[3], KEYS[5], KEYS[6], KEYS[12], KEYS[10], KEYS[11],
  KEYS[7], KEYS[8], order_id, ARGV[2], encode_items(items), total, units, balance, ARGV[5] == '1',
  ARGV[3], ARGV[4], list, current, placed, last, ORDER_FIELD.stripe, mark)
order.stripe = mark
-- The stock left goes to the app (its refills); a 201's record is the order id.
order.stripe_left = left
if request then
  store_record(KEYS[2], request, 201, order_id, ARGV[8])
end
return {201, cjson.encode(order), 0}
