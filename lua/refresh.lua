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
clock_commit()
local wake = {}
purge_leases(NOW, LEASE_NOW, wake)
purge_tickets(LEASE_NOW, wake)
flush_writes()
-- A fixed number of commands whatever the number of tickets: one HMGET and
-- one ZADD per chunk of tickets, one ZRANGE per queue.
local CHUNK = 500
local first, missing, heads = {}, {}, {}
for start = 2, #ARGV, CHUNK do
  local tickets = {}
  for i = start, math.min(#ARGV, start + CHUNK - 1) do tickets[#tickets + 1] = ARGV[i] end
  local infos = redis.call('HMGET', K.queue, unpack(tickets))
  local expiry = {}
  for k, ticket in ipairs(tickets) do
    local info = infos[k]
    if not info then
      missing[#missing + 1] = ticket
    else
      expiry[#expiry + 1] = LEASE_NOW + ttl
      expiry[#expiry + 1] = ticket
      local ahead = false
      for _, lk in ipairs(parse_queue_record(info).lks) do
        if heads[lk] == nil then heads[lk] = queue_head(lk) or false end
        if heads[lk] ~= ticket then ahead = true end
      end
      if not ahead then first[#first + 1] = ticket end
    end
  end
  if #expiry > 0 then redis.call('ZADD', K.queue_expiry, 'XX', unpack(expiry)) end
end
publish_wake(wake)
return {first, missing}
