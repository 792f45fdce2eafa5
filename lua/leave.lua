-- leave.lua: waiters give up their places (timeout, cancellation).
--
-- KEYS[1]  tenant base key "<prefix>:{<tenant>}"
-- ARGV     one ticket per argument (a client sends the leaves of one tenant
--          that are ready together as one batch: a crowd timing out at once
--          costs a few calls, not one per waiter)
--
-- Reply: a list with one 1 per ticket. Waiters that became the head of a
-- queue are woken.

clock_commit()
local wake = {}
local replies = {}
for i, ticket in ipairs(ARGV) do
  drop_ticket(ticket, wake)
  replies[i] = 1
end
publish_wake(wake)
return replies
