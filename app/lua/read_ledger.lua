-- read_ledger: one partition's ledger and the newest entry of some of its
-- indexes, in one atomic step, for the audit (app/admin/audit.py) and the
-- ledger rebuild. Reads only; writes nothing. Every key is of one partition
-- (app/keys.py), so on Redis Cluster it runs on that partition's node.
--
-- KEYS[1]     lg{P}            hash, the partition's running totals
-- KEYS[2..]   indexes of P     zsets (the phones, customers), or a seq clock (the
--                              orders': their status lists are in chunks; its value
--                              starts with the seq, app/keys.py: orders_seq), possibly none
-- ARGV[1..m]  the ledger fields wanted
--
-- Returns {present, values, newest}: present 1 when the ledger exists, else 0;
-- values the m fields (nil for a missing one); newest the score of each
-- index's newest entry, or the clock's last seq, in KEYS order ("" for an empty index).

local values = redis.call('HMGET', KEYS[1], unpack(ARGV))
local newest = {}
for i = 2, #KEYS do
  if redis.call('TYPE', KEYS[i]).ok == 'string' then
    newest[#newest + 1] = string.match(redis.call('GET', KEYS[i]), '^%d+') or ''
  else
    local last = redis.call('ZRANGE', KEYS[i], -1, -1, 'WITHSCORES')
    newest[#newest + 1] = last[2] or ''
  end
end
return {redis.call('EXISTS', KEYS[1]), values, newest}
