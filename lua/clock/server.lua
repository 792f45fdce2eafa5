-- clock/server.lua: time_ms(base) is the Redis server's clock in milliseconds,
-- so hosts with skewed clocks share one timeline; read once per call, for
-- every tenant it serves. Prepended to every script, before lib.lua, which
-- turns it into each tenant's clock NOW (a clock that never runs backward:
-- see "clock" in lib.lua).
local server_ms
local function time_ms(_)
  if not server_ms then
    local t = redis.call('TIME')
    server_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return server_ms
end
