-- wrk script: open orders, each cancelled by its customer as soon as it is placed
-- (loadtests/ab_refs.py --paths cancels). Data file and nonce as orders.lua's:
--   wrk -s loadtests/wrk/cancels.lua URL -- DATA_FILE NONCE
-- A request is a cancel when an order placed on this thread waits for one, else a new
-- open order. The connections of a thread share this state and their answers come in
-- any order, so a placing request's X-Request-ID (handed back by nginx and the app)
-- carries its token's index, and its answer, with the order's id, says whose it is.
-- Statuses are counted per thread; report.lua prints them ("wrk-statuses {...}").
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")

local counter = 0

function init(args)
  load_orders_data(args)
  placed = {}  -- {token index, order id} of each open order still to cancel
end

function request()
  counter = counter + 1
  local open = table.remove(placed)
  if open then
    local headers = {["Authorization"] = "Bearer " .. tokens[open[1]]}
    return wrk.format("POST", "/orders/" .. open[2] .. "/cancel", headers, "")
  end
  local token = (counter + id * 7919) % #tokens + 1
  local phone = phones[(counter * 31 + id) % #phones + 1]
  local headers = {
    ["Authorization"] = "Bearer " .. tokens[token],
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = prefix .. counter,
    ["X-Request-ID"] = prefix .. counter .. "-t" .. token,
  }
  local body = '{"items":[{"phone_id":"' .. phone .. '","quantity":1}],"autocheck":false}'
  return wrk.format("POST", "/orders", headers, body)
end

function response(status, headers, body)
  count_status(status)
  if status == 201 then
    local request_id = headers["X-Request-ID"] or headers["x-request-id"] or ""
    local token = tonumber(string.match(request_id, "%-t(%d+)$") or "")
    local order_id = string.match(body, '"id":"([^"]+)"')
    if token and order_id then
      table.insert(placed, {token, order_id})
    end
  end
end
