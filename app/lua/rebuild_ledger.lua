-- rebuild_ledger: replace the ledger's figures with a recount of the rows
-- (app/admin/ledger_rebuild.py), unless a script wrote while it was counted.
-- For a database written before the ledger existed; run at rest.
--
-- KEYS[1]     one partition's ledger (keys.ledger(P))
-- ARGV[1]     the ledger's `changes` when the recount began (0: no ledger)
-- ARGV[2..]   field, value, field, value, ...: every ledger figure but
--             `changes`, each an integer
--
-- Returns {1, changes} when written: `changes` is one more than before, so
-- an audit that overlapped the rebuild does not take it for a moment at rest.
-- {0, changes} when `changes` moved since the recount began: nothing written
-- (a script ran meanwhile, so the recount is not the shop of one moment).
-- An error reply, nothing written, for odd ARGV or a value not an integer.

if #ARGV < 3 or #ARGV % 2 ~= 1 or not string.match(ARGV[1], '^%d+$') then
  return redis.error_reply('rebuild_ledger: ARGV must be changes, then field/value pairs')
end
for i = 2, #ARGV, 2 do
  if ARGV[i] == 'changes' or not string.match(ARGV[i + 1], '^%-?%d+$') then
    return redis.error_reply('rebuild_ledger: bad figure ' .. ARGV[i] .. '=' .. ARGV[i + 1])
  end
end
local changes = tonumber(redis.call('HGET', KEYS[1], 'changes') or '0')
if changes ~= tonumber(ARGV[1]) then
  return {0, changes}
end

redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return {1, redis.call('HINCRBY', KEYS[1], 'changes', 1)}
