-- status.lua: a read-only snapshot of every limit that applies to a scope.
-- It writes nothing: NOW is the tenant's clock as the next writing script
-- would compute it (lib.lua, "clock"), not stored; leases are judged on the
-- same lease clock, and a lease whose expiry passed counts as expired even
-- when no script has purged it yet (its concurrency slot is free, its money
-- stays charged, as purge_leases will leave it).
--
-- KEYS[1]  tenant base key "<prefix>:{<tenant>}"
-- ARGV[1]  agent; '' for the tenant's own limits and those of every agent
--          that has used a window of its own. Every model's limits (scope
--          'M:<model>', tenant-wide) are shown either way.
--
-- Reply: {now_ms, queue_length, rows}, each row
--   {scope, limit_key, dimension, amount, window_ms, total, reserved,
--    overrun, refill_at_ms (-1 if nothing will expire), waiters}
-- where a calendar period (limit_key "...:<period>@<zone>", window_ms 0) has
-- its usage and overrun in the current period, and refill_at_ms = the
-- period's end (when its usage resets), whatever its usage;
-- and total includes the reserved part (the estimates of open
-- reservations, leases still running) and amounts are integers in the
-- dimension's unit; a concurrency total counts only leases still running.

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
-- The charges of the reservations whose lease expiry is in `low`..`high`
-- (ZRANGEBYSCORE bounds on the lease clock) that still count in their window,
-- summed per limit key; `dimension` nil for every dimension.
local function charged_by_limit(windows, low, high, dimension)
  local out = {}
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', K.leases, low, high)) do
    for _, c in ipairs(parse_charges(redis.call('HGET', reservation_key(id), 'c'))) do
      local w = windows[c.L.lk]
      local live = w ~= nil and w.g == c.gen and (dimension == nil or c.L.d == dimension) and
        (c.L.cal and c.idx == w.p or
         not c.L.cal and (c.L.w == 0 or c.idx >= math.floor(NOW / bucket_width(c.L)) - c.L.n))
      if live then out[c.L.lk] = (out[c.L.lk] or 0) + c.amt end
    end
  end
  return out
end

local limits, windows = {}, {}
local function show(a, model)
  for _, L in ipairs(applicable_limits(a, model)) do
    if not windows[L.lk] then
      windows[L.lk] = advance(L, NOW)
      limits[#limits + 1] = L
    end
  end
end
for _, a in ipairs(agents) do show(a, nil) end
for _, m in ipairs(limited_models()) do show('', m) end
local reserved = charged_by_limit(windows, '(' .. fmt(LEASE_NOW), '+inf', nil)
-- Leases expired but not purged yet: their concurrency is not in flight any more.
local expired = charged_by_limit(windows, '-inf', fmt(LEASE_NOW), 'concurrency')

local rows = {}
for _, L in ipairs(limits) do
  local t = math.max(0, windows[L.lk].t - (expired[L.lk] or 0))
  local refill = -1
  if L.cal or (t > 0 and L.w > 0) then refill = refill_at(L, 1, NOW) end
  local ov = windows[L.lk].dirty.ov and 0 or tonumber(redis.call('HGET', L.key, 'ov') or '0')
  rows[#rows + 1] = {L.scope, L.lk, L.d, L.a, L.w, t, reserved[L.lk] or 0, ov, refill,
                     redis.call('ZCARD', blocked_key(L.lk))}
end
return {NOW, redis.call('ZCARD', K.queue_expiry), rows}
