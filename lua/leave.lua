-- leave.lua: waiters give up their places (timeout, cancellation).
--
-- KEYS[1]  tenant base key "<prefix>:{<tenant>}"; KEYS[2..] more tenants
--          served by the same call (lib.lua "tenants")
-- ARGV     one ticket per argument (a client sends the leaves of one tenant
--          that are ready together as one batch: a crowd timing out at once
--          costs a few calls, not one per waiter); with several keys ARGV[1]
--          says how many tickets are each tenant's
--
-- Reply: a list with one 1 per ticket (tenant after tenant). Waiters that became the head of a
-- queue are woken.

return serve_tenants(function(first, last)
  clock_commit()
  local wake = {}
  local replies = {}
  for i = first, last do
    drop_ticket(ARGV[i], wake)
    replies[#replies + 1] = 1
  end
  publish_wake(wake)
  return replies
end)
