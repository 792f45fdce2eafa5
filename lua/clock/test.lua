-- clock/test.lua: for tests only. NOW is the value of KEYS[1]..':testclock'
-- when that key exists (a frozen clock that tests move by hand), else the
-- server clock. Only loaded by a Budget built with test_clock=True; the
-- production scripts never read that key.
local NOW = (function()
  local frozen = redis.call('GET', KEYS[1] .. ':testclock')
  if frozen then return tonumber(frozen) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end)()
