-- update_phone: change a phone's descriptive fields and price. Stock is not
-- touched here (restock.lua and the order scripts own it). Orders already
-- placed keep the unit price they were placed at.
--
-- KEYS[1]  p{Q}<phone_id>  hash, must exist (key names: app/keys.py)
-- ARGV     field, value, field, value, ... (fields limited by the caller to
--          name, description, image_url, price_cents; possibly none)
--
-- Returns {http_status, payload_json}:
--   200, phone fields (strings)
--   404, {code="phone_not_found"}   nothing written
--
-- hgetall_map: the prelude (app/lua_prelude.py).

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {404, cjson.encode({code = 'phone_not_found'})}
end
if #ARGV > 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV))
end
return {200, cjson.encode(hgetall_map(KEYS[1]))}
