-- clock/server.lua: NOW is the Redis server's clock in milliseconds, so hosts
-- with skewed clocks share one timeline. Prepended to every script.
local NOW = (function()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end)()
