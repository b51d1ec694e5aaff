#!lua
-- drain_phone: a recall's first step, on a phone's partition Q (docs/escrow.md, section 5).
-- Sets the phone's mode to draining, so that no grant starts from now on (a grant is
-- refused unless the mode is striped), and puts the phone on the settler's list of
-- recalls to finish (KEYS[4]) in case this app dies before its recall is done; then
-- answers the hosts holding a stripe of the phone and its grants in flight, read in the
-- same script: every grant that could still lend units is in that answer, since none can
-- start after it. An order path calls it after a stock_lent answer (reserve_stock.lua,
-- place_order.lua), the settler for each phone due on KEYS[4].
-- A phone that lends nothing (lent 0, no stripe host, no grant in flight) has nothing to
-- recall: a draining mode left on it goes, with its entry on KEYS[4], as
-- receive_shipments.lua ends a recall (the phone drained: not striped again until a
-- restock, and its count of ended recalls up by one), and nothing else is written.
-- The answer's `recalls` (the ended recalls so far) goes to this recall's
-- receive_shipments: a receipt whose drain came before another recall ended is stale, and
-- may not take a host off the stripe hosts or end the draining (the phone may have been
-- striped again since, its hosts granted anew).
-- Idempotent: a second run finds the phone draining and answers what is still out.
--
-- KEYS[1]  p{Q}<phone_id>   hash: the phone (mode, lent)
-- KEYS[2]  sh{Q}<phone_id>  set: host partitions holding a stripe of the phone
-- KEYS[3]  sg{Q}<phone_id>  set: "<host>:<grant id>" of its grants in flight
-- KEYS[4]  sw{Q}            zset: phone id by when the settler finishes its recall (ms)
-- ARGV[1]  phone id
-- ARGV[2]  when the settler finishes the recall if nobody did before, ms since the epoch
--
-- Returns {http_status, payload_json, wrote}:
--   200, {hosts=[...], grants=["<host>:<grant id>", ...], lent="n", recalls="n"}, 0|1
--        what the recall must close and fence (empty lists: nothing lent, nothing to do),
--        and the recalls ended so far (the phone's `recalls`)
--   404, {code="phone_not_found", phone_ids=[id]}, 0   nothing written
--
-- PHONE_MODE, end_recall: the prelude (app/lua_prelude.py).

if #KEYS ~= 4 or #ARGV ~= 2 or not tonumber(ARGV[2]) then
  return redis.error_reply('drain_phone: 4 keys, phone id and a due time')
end
local row = redis.call('HMGET', KEYS[1], 'price_cents', 'lent', 'mode', 'recalls')
if not row[1] then
  return {404, cjson.encode({code = 'phone_not_found', phone_ids = {ARGV[1]}}), 0}
end
local lent = tonumber(row[2] or '0')
local hosts = redis.call('SMEMBERS', KEYS[2])
local grants = redis.call('SMEMBERS', KEYS[3])
local answer = {hosts = hosts, grants = grants, lent = string.format('%d', lent),
  recalls = string.format('%d', tonumber(row[4] or '0'))}
if lent == 0 and #hosts == 0 and #grants == 0 then
  local wrote = 0
  if row[3] == PHONE_MODE.draining then
    end_recall(KEYS[1], KEYS[4], ARGV[1])
    wrote = 1
  end
  return {200, cjson.encode(answer), wrote}
end
local wrote = 0
if row[3] ~= PHONE_MODE.draining then
  redis.call('HSET', KEYS[1], 'mode', PHONE_MODE.draining)
  wrote = 1
end
if redis.call('ZADD', KEYS[4], 'NX', ARGV[2], ARGV[1]) == 1 then
  wrote = 1
end
return {200, cjson.encode(answer), wrote}
