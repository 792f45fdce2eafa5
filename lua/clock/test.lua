-- clock/test.lua: for tests only. time_ms(base) is the value of
-- base..':testclock' when that key exists (a frozen clock that tests move by
-- hand, forward or back, standing in for the server's TIME), else the server
-- clock. lib.lua makes NOW from it exactly as from the server clock. Only
-- loaded by a Budget built with test_clock=True; the production scripts never
-- read that key.
local function time_ms(base)
  local frozen = redis.call('GET', base .. ':testclock')
  if frozen then return tonumber(frozen) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
