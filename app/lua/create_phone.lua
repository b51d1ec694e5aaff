-- create_phone: store a new phone with its opening stock and index it, and
-- add it to the running totals of the ledger.
--
-- Key names: app/keys.py; Q is the phone's partition, and every key is in it.
--
-- KEYS[1]  p{Q}<phone_id>    hash, must not exist
-- KEYS[2]  ps{Q}             zset, by seq
-- KEYS[3]  pq{Q}             the partition's seq clock
-- KEYS[4]  lg{Q}             hash, the running totals
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
-- hgetall_map, next_seq: the prelude (app/lua_prelude.py).

if redis.call('EXISTS', KEYS[1]) == 1 then
  return {500, cjson.encode({code = 'phone_id_collision'})}
end
local seq = next_seq(KEYS[3])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'name', ARGV[2], 'description', ARGV[3],
  'image_url', ARGV[4], 'price_cents', ARGV[5], 'stock', ARGV[6], 'added_units', ARGV[6],
  'seq', seq, 'created_at', ARGV[7])
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('HINCRBY', KEYS[4], 'phones', 1)
redis.call('HINCRBY', KEYS[4], 'stock_units', ARGV[6])
redis.call('HINCRBY', KEYS[4], 'added_units', ARGV[6])
redis.call('HINCRBY', KEYS[4], 'changes', 1)
return {201, cjson.encode(hgetall_map(KEYS[1]))}
