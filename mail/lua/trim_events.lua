-- trim_events: XTRIM the events stream by MINID, never past an entry that a
-- consumer group still needs. For every group the floor is the lower of its
-- last-delivered-id (everything after it is undelivered; the last delivered
-- entry itself is kept too, which is conservative by one) and the oldest entry
-- in its pending list. Nothing is trimmed until the required group exists, and
-- never by MAXLEN. One script, so no group can move between the reads and the trim.
--
-- KEYS[1]  e{P}                       one partition's events stream (run per partition)
-- ARGV[1]  group that must exist before anything is trimmed ("mailer")
-- ARGV[2]  retention cutoff id "ms-0": entries older than it may go
--
-- Returns {trimmed, minid}: the number of entries removed and the MINID used
-- ({0, ""} when the stream or the group does not exist).
--
-- pairs_to_map: the prelude (app/lua_prelude.py).

local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

local function less(a, b)
  local a_ms, a_seq = parse(a)
  local b_ms, b_seq = parse(b)
  if a_ms ~= b_ms then
    return a_ms < b_ms
  end
  return a_seq < b_seq
end

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, ''}
end

local floor = ARGV[2]
local found = false
for _, flat in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local group = pairs_to_map(flat)
  if group['name'] == ARGV[1] then
    found = true
  end
  local keep = group['last-delivered-id']
  if tonumber(group['pending']) > 0 then
    local summary = redis.call('XPENDING', KEYS[1], group['name'])
    if less(summary[2], keep) then
      keep = summary[2]
    end
  end
  if less(keep, floor) then
    floor = keep
  end
end
if not found then
  return {0, ''}
end
return {redis.call('XTRIM', KEYS[1], 'MINID', floor), floor}
