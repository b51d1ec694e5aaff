#!lua flags=no-writes
-- count_newer: for some status lists of one partition, how many orders are newer than a
-- seq, from the chunks' counts (docs/data-tier.md 10.2): the deep pages' bisection
-- (app/status_lists.py), one call per partition per probe. Reads only.
--
-- Key names: app/keys.py; every key is in one partition P.
-- KEYS[2i-1]  on{P}<status>           hash, the status's orders per chunk and per group
-- KEYS[2i]    os{P}<status>:<b>       zset, the status's chunk b holding the seq (the
--             newest chunk starting at or before it)
-- ARGV[1]     the seq
-- ARGV[2i], ARGV[2i+1]  b and the list's newest chunk t (b <= t)
--
-- Returns the i-th list's count of orders newer than the seq: those of chunk b above it,
-- of chunks b+1 .. the end of b's group or t (at most CHUNK_GROUP - 1 fields), and of
-- the groups after b's up to t's.
--
-- CHUNK_GROUP: the prelude (app/lua_prelude.py).

local out = {}
for i = 1, #KEYS / 2 do
  local counts = KEYS[2 * i - 1]
  local b, top = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local n = redis.call('ZCOUNT', KEYS[2 * i], '(' .. ARGV[1], '+inf')
  local group = math.floor(b / CHUNK_GROUP)
  local last = math.min(top, (group + 1) * CHUNK_GROUP - 1)
  if last > b then
    local fields = {}
    for j = b + 1, last do
      fields[#fields + 1] = string.format('%d', j)
    end
    for _, value in ipairs(redis.call('HMGET', counts, unpack(fields))) do
      n = n + (tonumber(value) or 0)
    end
  end
  for g = group + 1, math.floor(top / CHUNK_GROUP) do
    n = n + (tonumber(redis.call('HGET', counts, string.format('g%d', g))) or 0)
  end
  out[i] = n
end
return out
