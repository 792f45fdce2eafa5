-- run.lua: open, join, leave and read a run (a short-lived scope of lifetime
-- caps; lib.lua, "runs"; slowburn_redis/runs.py).
--
-- KEYS[1]  tenant base key "<prefix>:{<tenant>}"
-- ARGV[1]  operation: 'open', 'end' or 'summary'
-- ARGV[2]  run id
-- open:    ARGV[3] agent ('' for none), ARGV[4] caps (JSON, as a scope of
--          B:limits; '' to join a run that must exist), ARGV[5] max_seconds
--          in ms (0 for none), ARGV[6] TTL of the run's keys in ms, refreshed
--          on every use
-- end:     ARGV[3] grace TTL in ms: when the last process inside leaves, the
--          run's keys expire that long after (a late commit still lands)
--
-- Reply:
--   open     {created (1, or 0 when the run existed: joined), agent, caps,
--             started_ms, deadline_ms (0 for none), now_ms}, or {-1} when
--             joining a run that does not exist (or expired)
--   end      {processes still inside}, or {-1} when the run is gone
--   summary  {1, now_ms, fields, caps}: fields the run hash flat (field,
--             value, ...), caps flat (limit_key, amount, used, ...); or {-1}
--             when the run is gone. Writes nothing.

local op, id = ARGV[1], ARGV[2]
local key = run_key(id)

local function expire_run(ttl)
  redis.call('PEXPIRE', key, ttl)
  for _, L in ipairs(run_state(id).caps) do redis.call('PEXPIRE', L.key, ttl) end
end

if op == 'open' then
  clock_commit()
  local existing = redis.call('HMGET', key, 'a', 'c', 't0', 'dl', 'x')
  if existing[2] then
    redis.call('HINCRBY', key, 'h', 1)
    expire_run(tonumber(existing[5]))
    return {0, existing[1], existing[2], tonumber(existing[3]), tonumber(existing[4]), NOW}
  end
  if ARGV[4] == '' then return {-1} end
  local max_ms, ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
  local deadline = max_ms > 0 and NOW + max_ms or 0
  redis.call('HSET', key, 'a', ARGV[3], 'c', ARGV[4], 't0', fmt(NOW), 'dl', fmt(deadline), 'x', fmt(ttl),
             'h', 1, 'n', 0)
  redis.call('PEXPIRE', key, ttl)
  publish_event('run_started', {agent = ARGV[3], run = id, caps = cjson.decode(ARGV[4]), max_ms = max_ms})
  return {1, ARGV[3], ARGV[4], NOW, deadline, NOW}
end

if op == 'end' then
  if redis.call('EXISTS', key) == 0 then return {-1} end
  local inside = redis.call('HINCRBY', key, 'h', -1)
  if inside <= 0 then
    redis.call('HSET', key, 'x', ARGV[3])
    expire_run(tonumber(ARGV[3]))
  end
  return {inside}
end

if op == 'summary' then
  local run = run_state(id)
  if run.gone then return {-1} end
  local caps = {}
  for _, L in ipairs(run.caps) do
    caps[#caps + 1] = L.lk
    caps[#caps + 1] = L.a
    caps[#caps + 1] = tonumber(redis.call('HGET', L.key, 't') or '0')
  end
  return {1, NOW, redis.call('HGETALL', key), caps}
end

return redis.error_reply('unknown run operation ' .. tostring(op))
