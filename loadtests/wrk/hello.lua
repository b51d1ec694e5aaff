-- wrk script: count response statuses (same "wrk-statuses" line as orders.lua).
--   wrk -s loadtests/wrk/hello.lua URL -- [DELAY_MS]
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
  delay_ms = tonumber(args[1] or "0")
  if delay_ms > 0 then
    delay = function() return delay_ms end
  end
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local merged = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      merged[status] = (merged[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(merged) do
    table.insert(parts, string.format('"%d": %d', status, n))
  end
  io.write("wrk-statuses {" .. table.concat(parts, ", ") .. "}\n")
  -- Latency percentiles in microseconds (wrk's --latency has no p95).
  io.write(string.format('wrk-latency {"p50": %d, "p95": %d, "p99": %d}\n',
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
