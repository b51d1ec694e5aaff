#!lua flags=no-writes
-- slot_page: one page of several sorted sets of one slot merged by score, newest first,
-- in one call (app/slot_paging.py): a customer's orders without a status filter, the
-- merge of its status indexes, all in its partition (app/orders/service.py). Read-only.
--
-- Newest first is the exact reverse of ascending (score, the set's place in KEYS,
-- member): on an equal score the later set comes first. Within one partition scores
-- are seqs, unique, so ties do not arise; the rule only keeps the answer exact if they do.
--
-- The row at the offset is found by bisection on ranks, not by walking them: for each
-- set, the ranks it could have there are [lo, hi] (none before the offset less the other
-- sets' rows, none past the offset). A probe, the middle rank of the widest range, counts
-- the rows of every other set ahead of it (ZCOUNT) and so knows its own place in the
-- merge; that narrows every set's range. Each set's range at least halves when it is
-- probed, so a page costs at most #KEYS * (log2(offset + 1) + 1) probes of #KEYS
-- commands, each O(log N): bounded by the offset, not the number of rows. Below offset
-- HEAD_ROWS the sets' first offset + count rows are merged instead, without probes (the
-- app reads those pages with plain reads, app/slot_paging.py; this keeps the script
-- whole for any offset).
--
-- KEYS[1..k]  the sorted sets, all of one slot (co{P}<customer id>:<status>, every status)
-- ARGV[1]     offset: rows of the merge before the page
-- ARGV[2]     count: rows in the page
--
-- Returns {total, members}: total the rows of all the sets; members those at offset ..
-- offset + count - 1 of the merge (fewer at its end, none past it).

-- Where merging every set's first rows costs about what a few probes would.
local HEAD_ROWS = 32
local offset, count = tonumber(ARGV[1]), tonumber(ARGV[2])
local k = #KEYS
local card, total = {}, 0
for i = 1, k do
  card[i] = redis.call('ZCARD', KEYS[i])
  total = total + card[i]
end
if offset >= total or count < 1 then
  return {total, {}}
end

local lo, hi = {}, {}
for i = 1, k do
  lo[i] = math.max(0, offset - (total - card[i]))
  hi[i] = math.min(card[i] - 1, offset)
end

-- ahead[j]: the rows of set j ahead of the row at the offset (set i's own: its rank).
-- Near the head the first rows of every set are merged instead (skipping the offset's):
-- fewer calls than the probes for the pages most often read.
local ahead, skip = nil, 0
if offset < HEAD_ROWS then
  ahead, skip = {}, offset
  for j = 1, k do
    ahead[j] = 0
  end
end
while not ahead do
  local i, widest = nil, 0
  for j = 1, k do
    if hi[j] - lo[j] + 1 > widest then
      i, widest = j, hi[j] - lo[j] + 1
    end
  end
  if not i then
    return redis.error_reply('slot_page: no row at offset ' .. offset)
  end
  local rank = math.floor((lo[i] + hi[i]) / 2)
  -- The score as Redis wrote it, passed back as it is: no float formatting in Lua.
  local score = redis.call('ZREVRANGE', KEYS[i], rank, rank, 'WITHSCORES')[2]
  local counts, place = {}, 0
  for j = 1, k do
    if j == i then
      counts[j] = rank
    elseif j < i then
      counts[j] = redis.call('ZCOUNT', KEYS[j], '(' .. score, '+inf')
    else
      counts[j] = redis.call('ZCOUNT', KEYS[j], score, '+inf')
    end
    place = place + counts[j]
  end
  if place == offset then
    ahead = counts
  elseif place < offset then
    for j = 1, k do
      lo[j] = math.max(lo[j], counts[j])
    end
    lo[i] = rank + 1
  else
    for j = 1, k do
      hi[j] = math.min(hi[j], counts[j] - 1)
    end
    hi[i] = rank - 1
  end
end

-- Each set's next `skip + count` rows from there hold the page: merge them.
local rows, next_row = {}, {}
for j = 1, k do
  if ahead[j] < card[j] then
    local last = ahead[j] + skip + count - 1
    rows[j] = redis.call('ZREVRANGE', KEYS[j], ahead[j], last, 'WITHSCORES')
  else
    rows[j] = {}
  end
  next_row[j] = 1
end
local members, taken = {}, 0
while #members < count do
  local best, best_score
  for j = k, 1, -1 do
    local at = next_row[j]
    if at < #rows[j] then
      local score = tonumber(rows[j][at + 1])
      if best == nil or score > best_score then
        best, best_score = j, score
      end
    end
  end
  if not best then
    break
  end
  taken = taken + 1
  if taken > skip then
    members[#members + 1] = rows[best][next_row[best]]
  end
  next_row[best] = next_row[best] + 2
end
return {total, members}
