-- clock/server.lua: TIME_MS is the Redis server's clock in milliseconds, so
-- hosts with skewed clocks share one timeline. Prepended to every script,
-- before lib.lua, which turns TIME_MS into the tenant's clock NOW (a clock
-- that never runs backward: see "clock" in lib.lua).
local TIME_MS = (function()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end)()
