-- create_phone: store a new phone with its opening stock and index it, and
-- add it to the running totals of the ledger.
--
-- KEYS[1]  phone:{phone_id}  hash, must not exist
-- KEYS[2]  phones            zset, by seq
-- KEYS[3]  phones:seq        counter
-- KEYS[4]  ledger            hash, the running totals (app/keys.py)
-- ARGV[1]  phone id
-- ARGV[2]  name
-- ARGV[3]  description
-- ARGV[4]  image_url
-- ARGV[5]  price_cents (1..10^9, checked by the caller)
-- ARGV[6]  stock (0..10^9, checked by the caller)
-- ARGV[7]  now, ms since the epoch
--
-- Returns {http_status, payload_json}:
--   201, phone fields (strings)
--   500, {code="phone_id_collision"}   nothing written
--
-- hgetall_map: the prelude (app/lua_prelude.py).

if redis.call('EXISTS', KEYS[1]) == 1 then
  return {500, cjson.encode({code = 'phone_id_collision'})}
end
local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'name', ARGV[2], 'description', ARGV[3],
  'image_url', ARGV[4], 'price_cents', ARGV[5], 'stock', ARGV[6], 'added_units', ARGV[6],
  'seq', seq, 'created_at', ARGV[7])
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('HINCRBY', KEYS[4], 'phones', 1)
redis.call('HINCRBY', KEYS[4], 'stock_units', ARGV[6])
redis.call('HINCRBY', KEYS[4], 'added_units', ARGV[6])
redis.call('HINCRBY', KEYS[4], 'changes', 1)
return {201, cjson.encode(hgetall_map(KEYS[1]))}
