-- create_customer: store a customer with an opening balance, reserve the
-- email (unique, case-insensitive), map the token's hash to the id, and add
-- the opening balance to the ledger's running totals.
--
-- Key names: app/keys.py. P is the partition of the lower-cased email, which
-- the customer id and the token were minted in: every key is in it.
--
-- KEYS[1]  c{P}<customer_id>        hash, must not exist
-- KEYS[2]  cs{P}                    zset, by seq
-- KEYS[3]  cq{P}                    the partition's seq clock
-- KEYS[4]  ce{P}                    hash, lower-cased email -> id
-- KEYS[5]  k{P}<token_sha256>       string -> customer id
-- KEYS[6]  lg{P}                    hash, the running totals
-- ARGV[1]  customer id
-- ARGV[2]  name
-- ARGV[3]  surname
-- ARGV[4]  email as given
-- ARGV[5]  email lower-cased (the uniqueness key)
-- ARGV[6]  balance_cents (0..10^12, checked by the caller)
-- ARGV[7]  token sha256 (hex)
-- ARGV[8]  now, ms since the epoch
--
-- Returns {http_status, payload_json}:
--   201, customer fields (strings, token hash left out)
--   409, {code="email_taken"}            nothing written
--   500, {code="customer_id_collision"}  nothing written
--
-- next_seq: the prelude (app/lua_prelude.py).

if redis.call('HEXISTS', KEYS[4], ARGV[5]) == 1 then
  return {409, cjson.encode({code = 'email_taken'})}
end
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[5]) == 1 then
  return {500, cjson.encode({code = 'customer_id_collision'})}
end
local seq = next_seq(KEYS[3])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'name', ARGV[2], 'surname', ARGV[3], 'email', ARGV[4],
  'balance_cents', ARGV[6], 'added_cents', ARGV[6], 'token_sha256', ARGV[7],
  'seq', seq, 'created_at', ARGV[8])
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('HSET', KEYS[4], ARGV[5], ARGV[1])
redis.call('SET', KEYS[5], ARGV[1])
redis.call('HINCRBY', KEYS[6], 'customers', 1)
redis.call('HINCRBY', KEYS[6], 'balance_cents', ARGV[6])
redis.call('HINCRBY', KEYS[6], 'added_cents', ARGV[6])
redis.call('HINCRBY', KEYS[6], 'changes', 1)
return {201, cjson.encode({id = ARGV[1], name = ARGV[2], surname = ARGV[3], email = ARGV[4],
  balance_cents = ARGV[6], created_at = ARGV[8]})}
