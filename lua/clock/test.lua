-- clock/test.lua: the server clock plus an offset kept in KEYS[1]..':testclock',
-- so tests can move one tenant's time forward. Only loaded by a Budget built
-- with test_clock=True; production scripts never read that key.
local NOW = (function()
  local t = redis.call('TIME')
  local offset = tonumber(redis.call('GET', KEYS[1] .. ':testclock') or '0')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + offset
end)()
