-- announce.lua: an event the client makes (not a script), appended to the
-- tenant's trail and published exactly as the scripts' own events are
-- (lib.lua, publish_event), so that trail order and channel order agree.
--
-- KEYS[1]  tenant base key "<prefix>:{<tenant>}"
-- ARGV[1]  event type (e.g. 'limits_reseeded')
-- ARGV[2]  the event's other fields, a JSON object ('type' and 'ts' are set
--          here: ts is the tenant's clock, NOW)
--
-- Reply: the trail entry's stream id.

clock_commit()
local fields = cjson.decode(ARGV[2])
return publish_event(ARGV[1], fields)
