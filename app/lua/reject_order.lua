#!lua
-- reject_order: the saga's answer when a reserve refused a line (docs/data-tier.md, 3.1),
-- on the customer's partition P, with today's precedence: the Idempotency-Key record
-- first (a stored answer wins: a replayed 201 is never turned into a fresh 409), then
-- customer_not_found, then the phones' refusal the app merged from the reserves
-- (phone_not_found before out_of_stock). The refusal is stored for the key, as
-- place_order does, and as the order id's abort marker, so the commit can never run for
-- it and a retried call answers the same.
--
-- KEYS[1]  c{P}<customer_id>                 hash
-- KEYS[2]  i{P}<bucket>                      hash, the newest Idempotency-Key bucket (a new
--          record goes here; all of them ignored unless ARGV[2] == "1")
-- KEYS[3]  ab{P}                             hash: order id -> refusal (the abort markers)
-- KEYS[4]  ad{P}                             zset: order id by when its marker may be pruned
-- KEYS[5]    i{P}<bucket>                    the older Idempotency-Key bucket (the window before KEYS[2]'s)
-- ARGV[1]  order id
-- ARGV[2]  "1" when an Idempotency-Key was given, else "0"
-- ARGV[3]  the key's record field (16 bytes) then the request's fingerprint (12
--          bytes of the canonical body's sha256): app/orders/idempotency.py
-- ARGV[4]  when KEYS[2] expires, Unix seconds (app/orders/idempotency.py)
-- ARGV[5]  the phones' refusal: HTTP status (404 or 409)
-- ARGV[6]  its payload, JSON ({code="phone_not_found", ...} or {code="out_of_stock", ...})
-- ARGV[7]  keep-until of a marker written now, ms since the epoch (app/orders/saga.py)
--
-- Returns {http_status, payload_json, replayed}:
--   the stored refusal, 0                 rejected before (a retried call)
--   201, {replay_of=order id}, 1 or a stored refusal, 1
--                                         the key's first answer, replayed (the app
--                                         rebuilds a 201 from the order)
--   422, {code="idempotency_key_reused"}, 0
--   404, {code="customer_not_found"}, 0
--   ARGV[5], ARGV[6], 0                   the phones' refusal
--   error reply "reject_order: ..."       KEYS do not fit; nothing written
--
-- record_buckets, find_record, store_record, replay_reply: the prelude (app/lua_prelude.py).

if #KEYS ~= 5 then
  return redis.error_reply('reject_order: expected 5 keys, got ' .. #KEYS)
end

local order_id = ARGV[1]
local function mark(value)
  redis.call('HSET', KEYS[3], order_id, value)
  redis.call('ZADD', KEYS[4], 'GT', ARGV[7], order_id)
end

local marker = redis.call('HGET', KEYS[3], order_id)
if marker and marker ~= 'replayed' and marker ~= 'swept' then
  local space = string.find(marker, ' ', 1, true)
  return {tonumber(string.sub(marker, 1, space - 1)), string.sub(marker, space + 1), 0}
end

local use_idem = ARGV[2] == '1'
if use_idem then
  local same_body, stored_status, body = find_record(record_buckets(KEYS, 2), ARGV[3])
  if same_body ~= nil then
    if not same_body then
      local reused = cjson.encode({code = 'idempotency_key_reused'})
      mark('422 ' .. reused)
      return {422, reused, 0}
    end
    mark('replayed')
    return replay_reply(stored_status, body)
  end
end

local status, payload = tonumber(ARGV[5]), ARGV[6]
if redis.call('EXISTS', KEYS[1]) == 0 then
  status, payload = 404, cjson.encode({code = 'customer_not_found'})
end
if use_idem then
  store_record(KEYS[2], ARGV[3], status, payload, ARGV[4])
end
mark(status .. ' ' .. payload)
return {status, payload, 0}
