-- reset.lua: forget the usage of a tenant's windows and wake every waiter.
-- Reservations still open when the windows are reset settle against nothing
-- (their windows are a new generation).
--
-- KEYS[1]  tenant base key "<prefix>:{<tenant>}"
-- ARGV[1]  agent: '' resets the tenant's own windows, every agent's and
--          every model's; a name resets only that agent's windows
-- ARGV[2]  dimension: '' for every dimension except concurrency (calls in
--          flight are real; reset them by naming 'concurrency')
--
-- Reply: the number of windows deleted.
--
-- Clock: reads the tenant's clock (NOW, lib.lua) and does not store it (no
-- clock_commit): an admin action moves no mark; the next worker script does.
--
-- Access control: the first write is to B:admin (the last admin action, a
-- JSON string), a key a worker ACL user cannot write, so a worker's reset
-- fails with NOPERM before anything changes.

local agent, dim = ARGV[1], ARGV[2]
redis.call('SET', K.admin, cjson.encode({op = 'reset', agent = agent, dimension = dim, ts = NOW}))
local agents
if agent == '' then
  agents = {''}
  for _, a in ipairs(redis.call('SMEMBERS', K.agents)) do agents[#agents + 1] = a end
else
  agents = {agent}
end

local models = agent == '' and limited_models() or {}
local deleted = 0
local function reset_windows(a, model)
  for _, L in ipairs(applicable_limits(a, model)) do
    local mine = (agent == '') or (L.scope ~= 'T' and L.scope ~= 'M:' .. (model or ''))
    local match = (dim == '' and L.d ~= 'concurrency') or L.d == dim
    if mine and match then deleted = deleted + redis.call('DEL', L.key) end
  end
end
for _, a in ipairs(agents) do reset_windows(a, nil) end
for _, m in ipairs(models) do reset_windows('', m) end

publish_event('reset', {agent = agent, dimension = dim, windows = deleted})
redis.call('PUBLISH', K.wake, '*')
return deleted
