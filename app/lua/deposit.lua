-- deposit: add money to a customer's balance, and to the money ever added
-- that the audit balances against; the ledger's totals move with them.
--
-- KEYS[1]  c{P}<customer_id>  hash, must exist (key names: app/keys.py)
-- KEYS[2]  lg{P}              hash, the running totals of its partition
-- ARGV[1]  amount_cents (1..10^12, checked by the caller)
-- ARGV[2]  balance ceiling: the deposit is refused past it (keeps every sum
--          below 2^53, where Lua numbers stop being exact)
--
-- Returns {http_status, payload_json}:
--   200, customer fields (strings, token hash left out)
--   404, {code="customer_not_found"}               nothing written
--   409, {code="balance_limit", balance_cents, limit}  nothing written

local balance = redis.call('HGET', KEYS[1], 'balance_cents')
if not balance then
  return {404, cjson.encode({code = 'customer_not_found'})}
end
if tonumber(balance) + tonumber(ARGV[1]) > tonumber(ARGV[2]) then
  return {409, cjson.encode({code = 'balance_limit', balance_cents = balance, limit = ARGV[2]})}
end
redis.call('HINCRBY', KEYS[1], 'balance_cents', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'added_cents', ARGV[1])
redis.call('HINCRBY', KEYS[2], 'balance_cents', ARGV[1])
redis.call('HINCRBY', KEYS[2], 'added_cents', ARGV[1])
redis.call('HINCRBY', KEYS[2], 'changes', 1)
local row = redis.call('HMGET', KEYS[1], 'id', 'name', 'surname', 'email', 'balance_cents', 'created_at')
return {200, cjson.encode({id = row[1], name = row[2], surname = row[3], email = row[4],
  balance_cents = row[5], created_at = row[6]})}
