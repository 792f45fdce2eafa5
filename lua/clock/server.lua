-- clock/server.lua: time_ms(base) is the Redis server's clock in milliseconds,
-- so hosts with skewed clocks share one timeline. Prepended to every script,
-- before lib.lua, which turns it into each tenant's clock NOW (a clock that
-- never runs backward: see "clock" in lib.lua).
local function time_ms(_)
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
