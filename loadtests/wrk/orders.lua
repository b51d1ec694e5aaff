-- wrk script: POST /orders, each request with its own Idempotency-Key and a
-- customer's bearer token taken round-robin. loadtests/bench.py writes the
-- data file it loads (tokens and phone ids) and passes its path as the
-- first script argument:
--   wrk -s loadtests/wrk/orders.lua URL -- DATA_FILE NONCE [DELAY_MS]
-- The response status of every request is counted per thread; report.lua
-- prints them as one JSON line "wrk-statuses {...}" that bench.py parses.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")

local counter = 0

function init(args)
  load_orders_data(args)
  delay_ms = tonumber(args[3] or "0")
  if delay_ms > 0 then
    -- wrk looks for delay() after init: define it only when pacing.
    delay = function() return delay_ms end
  end
end

function request()
  counter = counter + 1
  local token = tokens[(counter + id * 7919) % #tokens + 1]
  local phone = phones[(counter * 31 + id) % #phones + 1]
  local headers = {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = prefix .. counter,
  }
  local body = '{"items":[{"phone_id":"' .. phone .. '","quantity":1}]}'
  return wrk.format("POST", "/orders", headers, body)
end

function response(status, headers, body)
  count_status(status)
end
