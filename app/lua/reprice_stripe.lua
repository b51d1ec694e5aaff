-- reprice_stripe: a price change written to one stripe of a phone, on its host
-- partition S (docs/escrow.md, section 6). Applies only if the generation is newer
-- than the stripe's: idempotent, and a late one never undoes a newer price (a grant
-- received with a newer generation, a later PATCH's reprice). A stripe not there yet
-- (a grant reserved before the price change, its receipt still to come) is made with
-- no units at the new price (epoch 0, as receive_grant.lua starts one), so that the
-- receipt, carrying the older generation, keeps it. Moves no units: no ledger.
--
-- KEYS[1]  sq{S}<phone_id>  hash: the stripe (key names: app/keys.py)
-- ARGV[1]  the phone's price generation (an integer >= 0)
-- ARGV[2]  the phone's unit price at that generation, cents
--
-- Returns {http_status, payload_json, applied}:
--   200, {gen, price_cents}, 1    written now
--   200, {gen, price_cents}, 0    the stripe's generation was as new or newer; nothing written

local stripe = redis.call('HMGET', KEYS[1], 'gen', 'price_cents')
if stripe[1] and tonumber(stripe[1]) >= tonumber(ARGV[1]) then
  return {200, cjson.encode({gen = stripe[1], price_cents = stripe[2]}), 0}
end
redis.call('HSET', KEYS[1], 'gen', ARGV[1], 'price_cents', ARGV[2])
if redis.call('HEXISTS', KEYS[1], 'epoch') == 0 then
  -- A new stripe, as receive_grant.lua starts one: epoch 0, nothing sold.
  redis.call('HSET', KEYS[1], 'stock', 0, 'sold', 0, 'got', 0, 'epoch', 0)
end
return {200, cjson.encode({gen = ARGV[1], price_cents = ARGV[2]}), 1}
