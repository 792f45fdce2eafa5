-- status.lua: a read-only snapshot of every limit that applies to a scope.
--
-- KEYS[1]  tenant base key "<prefix>:{<tenant>}"
-- ARGV[1]  agent; '' for the tenant's own limits and those of every agent
--          that has used a window of its own
--
-- Reply: {now_ms, queue_length, rows}, each row
--   {scope, limit_key, dimension, amount, window_ms, total, reserved,
--    overrun, refill_at_ms (-1 if nothing will expire), waiters}
-- where total includes the reserved part (the estimates of open
-- reservations) and amounts are integers in the dimension's unit.

local agent = ARGV[1]
local agents
if agent == '' then
  agents = {''}
  for _, a in ipairs(redis.call('SMEMBERS', B .. ':agents')) do agents[#agents + 1] = a end
  table.sort(agents)
else
  agents = {agent}
end

local rows, seen = {}, {}
for _, a in ipairs(agents) do
  for _, L in ipairs(applicable_limits(a)) do
    if not seen[L.lk] then
      seen[L.lk] = true
      local t, r = advance(L, NOW, false)
      local refill = -1
      if t > 0 and L.w > 0 then refill = refill_at(L, 1, NOW) end
      local ov = tonumber(redis.call('HGET', L.key, 'ov') or '0')
      rows[#rows + 1] = {L.scope, L.lk, L.d, L.a, L.w, t, r, ov, refill,
                         redis.call('ZCARD', B .. ':b:' .. L.lk)}
    end
  end
end
return {NOW, redis.call('ZCARD', B .. ':qexp'), rows}
