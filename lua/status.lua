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
  for _, a in ipairs(redis.call('SMEMBERS', K.agents)) do agents[#agents + 1] = a end
  table.sort(agents)
else
  agents = {agent}
end

-- The reserved part of each window: the estimates of open reservations whose
-- lease is still running and whose bucket still counts in that window.
local function reserved_by_limit(windows)
  local out = {}
  local open = redis.call('ZRANGEBYSCORE', K.leases, '(' .. NOW, '+inf')
  for _, id in ipairs(open) do
    for _, c in ipairs(parse_charges(redis.call('HGET', reservation_key(id), 'c'))) do
      local w = windows[c.L.lk]
      local live = w ~= nil and w.g == c.gen and
        (c.L.w == 0 or c.idx >= math.floor(NOW / bucket_width(c.L)) - c.L.n)
      if live then out[c.L.lk] = (out[c.L.lk] or 0) + c.amt end
    end
  end
  return out
end

local limits, windows = {}, {}
for _, a in ipairs(agents) do
  for _, L in ipairs(applicable_limits(a)) do
    if not windows[L.lk] then
      windows[L.lk] = advance(L, NOW)
      limits[#limits + 1] = L
    end
  end
end
local reserved = reserved_by_limit(windows)

local rows = {}
for _, L in ipairs(limits) do
  local t = windows[L.lk].t
  local refill = -1
  if t > 0 and L.w > 0 then refill = refill_at(L, 1, NOW) end
  local ov = tonumber(redis.call('HGET', L.key, 'ov') or '0')
  rows[#rows + 1] = {L.scope, L.lk, L.d, L.a, L.w, t, reserved[L.lk] or 0, ov, refill,
                     redis.call('ZCARD', blocked_key(L.lk))}
end
return {NOW, redis.call('ZCARD', K.queue_expiry), rows}
