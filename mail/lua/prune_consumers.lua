-- prune_consumers: delete consumers of a group that hold no pending entry and
-- have not read for a long time: workers that stopped for good (the default
-- worker name carries the pid, so every restart adds a consumer). The pending
-- count is checked in the same script as XGROUP DELCONSUMER, so an entry can
-- never be dropped with its consumer.
--
-- KEYS[1]  e{P}       one partition's events stream (run per partition)
-- ARGV[1]  group      ("mailer")
-- ARGV[2]  minimum idle time, ms
-- ARGV[3]  consumer never to delete (the caller itself)
--
-- Returns the number of consumers deleted.
--
-- pairs_to_map: the prelude (app/lua_prelude.py).

if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then
  return 0  -- no such group
end
local deleted = 0
for _, flat in ipairs(consumers) do
  local consumer = pairs_to_map(flat)
  if consumer['name'] ~= ARGV[3] and tonumber(consumer['pending']) == 0
      and tonumber(consumer['idle']) >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], consumer['name'])
    deleted = deleted + 1
  end
end
return deleted
