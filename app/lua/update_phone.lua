-- update_phone: change a phone's descriptive fields and price. Stock is not
-- touched here (restock.lua and the order scripts own it). Orders already
-- placed keep the unit price they were placed at.
-- A price change (docs/escrow.md, section 6) bumps the phone's price generation
-- ``gen``; when the phone has stripes (its stripe hosts set is not empty), it also
-- puts "<phone_id>:<gen>" on the partition's reprices due list, due at ARGV[2], and
-- answers the hosts: the app writes the price to every stripe (reprice_stripe.lua)
-- before its 200 and then takes the entry off the list; the settler's sweep finishes
-- it for a request that died. A price given equal to the stored one keeps ``gen``
-- but is written to the stripes all the same (a retried PATCH finishes a dead one's).
--
-- KEYS[1]  p{Q}<phone_id>   hash, must exist (key names: app/keys.py)
-- KEYS[2]  sh{Q}<phone_id>  set: the host partitions holding a stripe of the phone
-- KEYS[3]  sp{Q}            zset: "<phone_id>:<gen>" by due time (ms), reprices not yet done
-- ARGV[1]  the phone's entry on sp{Q} but its generation: "<phone_id>:" (app/keys.py:
--          reprice_entry)
-- ARGV[2]  when a reprice left undone is due for the settler, ms since the epoch
-- ARGV[3..] field, value, field, value, ... (fields limited by the caller to
--          name, description, image_url, price_cents; possibly none)
--
-- Returns {http_status, payload_json, 0, reprice_json}:
--   200, phone fields (strings), 0, {}                 no stripe to reprice
--   200, phone fields (strings), 0, {gen, price_cents, hosts=[partition, ...], due}
--                                                      the stripes to reprice
--   404, {code="phone_not_found"}, 0, {}               nothing written
--
-- hgetall_map: the prelude (app/lua_prelude.py).

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {404, cjson.encode({code = 'phone_not_found'}), 0, '{}'}
end
local price
for i = 3, #ARGV - 1, 2 do
  if ARGV[i] == 'price_cents' then
    price = ARGV[i + 1]
  end
end
if price and price ~= redis.call('HGET', KEYS[1], 'price_cents') then
  redis.call('HINCRBY', KEYS[1], 'gen', 1)
end
if #ARGV > 2 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 3))
end
local reprice = '{}'
if price then
  local hosts = redis.call('SMEMBERS', KEYS[2])
  if #hosts > 0 then
    local gen = redis.call('HGET', KEYS[1], 'gen') or '0'
    local due = ARGV[1] .. gen
    redis.call('ZADD', KEYS[3], ARGV[2], due)
    reprice = cjson.encode({gen = gen, price_cents = price, hosts = hosts, due = due})
  end
end
return {200, cjson.encode(hgetall_map(KEYS[1])), 0, reprice}
