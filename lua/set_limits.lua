-- set_limits.lua: replace the limits of one scope, wake every waiter of the
-- tenant (a raised or removed limit may let them in) and announce the change.
-- Windows of limits that no longer apply are deleted; the usage of a limit
-- that stays (same dimension and window or period) is kept, so lowering an amount
-- takes effect against what was already spent.
--
-- KEYS[1]  tenant base key "<prefix>:{<tenant>}"
-- ARGV[1]  scope field: 'T' (tenant), 'D' (default for every agent),
--          'A:<agent>' or 'M:<model>'
-- ARGV[2]  JSON list of {"d": dimension, "a": integer amount, "w": window ms
--          (0 for a lifetime cap)}, validated by the client; a calendar
--          period adds "c": 'day' | 'week' | 'month', "z": zone name and
--          "o": its offset table (lib.lua, "calendar periods"), with "w" 0;
--          '' clears
--
-- Reply: the number of windows deleted.
--
-- Clock: reads the tenant's clock (NOW, lib.lua) and does not store it (no
-- clock_commit): an admin action moves no mark; the next worker script does.
--
-- Access control: the first write is to B:admin (the last admin action, a
-- JSON string), a key a worker ACL user cannot write, so a worker's
-- set_limits fails with NOPERM before anything changes (its access to
-- B:limits is read-only as well).

local field, json = ARGV[1], ARGV[2]
redis.call('SET', K.admin, cjson.encode({op = 'set_limits', scope = field, ts = NOW}))

-- The agents (and model) whose applicable limits this change touches.
local agents, model = {}, nil
if field == 'T' then agents = {''}
elseif field == 'D' then
  for _, a in ipairs(redis.call('SMEMBERS', K.agents)) do agents[#agents + 1] = a end
elseif string.sub(field, 1, 2) == 'M:' then agents, model = {''}, string.sub(field, 3)
else agents = {string.sub(field, 3)} end

local before = {}
for _, a in ipairs(agents) do
  for _, L in ipairs(applicable_limits(a, model)) do before[L.lk] = L end
end
if json == '' then
  redis.call('HDEL', K.limits, field)
else
  redis.call('HSET', K.limits, field, json)
end
local after = {}
for _, a in ipairs(agents) do
  for _, L in ipairs(applicable_limits(a, model)) do after[L.lk] = true end
end

local deleted = 0
for lk, L in pairs(before) do
  if not after[lk] then deleted = deleted + redis.call('DEL', L.key) end
end

publish_event('limits_changed', {scope = field, limits = json})
redis.call('PUBLISH', K.wake, '*')
return deleted
