-- leave.lua: a waiter gives up its place (timeout, cancellation).
--
-- KEYS[1]  tenant base key "<prefix>:{<tenant>}"
-- ARGV[1]  ticket
--
-- Reply: 1. Waiters that became the head of a queue are woken.

clock_commit()
local wake = {}
drop_ticket(ARGV[1], wake)
publish_wake(wake)
return 1
