-- clock/test.lua: for tests only. TIME_MS is the value of KEYS[1]..':testclock'
-- when that key exists (a frozen clock that tests move by hand, forward or
-- back, standing in for the server's TIME), else the server clock. lib.lua
-- makes NOW from it exactly as from the server clock. Only loaded by a Budget
-- built with test_clock=True; the production scripts never read that key.
local TIME_MS = (function()
  local frozen = redis.call('GET', KEYS[1] .. ':testclock')
  if frozen then return tonumber(frozen) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end)()
