-- refresh.lua: one process's heartbeat for all its waiters of one tenant.
-- Keeps their queue places alive, drops places and leases that expired, and
-- says which waiters stand first in every queue they wait in (the safety net
-- for a wake notification lost while the process was disconnected).
--
-- KEYS[1]  tenant base key "<prefix>:{<tenant>}"
-- ARGV[1]  TTL of a queue place in ms
-- ARGV[2..] tickets held by this process
--
-- Reply: {first, missing}: the tickets that stand first everywhere they wait,
-- and the tickets the queue no longer knows (their place expired).

local ttl = tonumber(ARGV[1])
local wake = {}
purge_leases(NOW, wake)
purge_tickets(NOW, wake)
local first, missing = {}, {}
for i = 2, #ARGV do
  local ticket = ARGV[i]
  local info = redis.call('HGET', B .. ':q', ticket)
  if not info then
    missing[#missing + 1] = ticket
  else
    redis.call('ZADD', B .. ':qexp', 'XX', NOW + ttl, ticket)
    local ahead = false
    for _, lk in ipairs(split(split(info, '|')[3] or '', ' ')) do
      if queue_head(lk) ~= ticket then ahead = true end
    end
    if not ahead then first[#first + 1] = ticket end
  end
end
publish_wake(wake)
return {first, missing}
