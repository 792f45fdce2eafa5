"""Events of a tenant: published on its event channel and kept in its durable trail, by the scripts.

Every event is appended to the tenant's trail, the Redis stream
``<base>:trail`` (the last `slowburn_redis.trail.TRAIL_MAXLEN` = 10,000
kept, exact trim), and published on ``<base>:events``, by the same script and
in the same step, so a threshold crossed while nobody listened is still there
to replay. The stream entry holds the event's JSON in its field ``event``;
the published message is that JSON with the entry's stream id added as
``id``. `Event.id` is that id (None only for a message from a version that
kept no trail). ``ts`` is the tenant's clock (lua/lib.lua "clock": the
server's TIME, never running backward), the stream id the Redis server's own
time (ms, also never backward per stream); they agree but after a clock step
back or under the test clock. `Budget.events(tenant, since=...)` replays the
trail and then follows the channel (see `slowburn_redis.trail`).

Types: ``threshold`` (50/75/90/100 % of a limit, once per crossing),
``exhausted`` (a request was denied by a spent limit), ``waiting``,
``resumed``, ``overrun``, ``lease_expired``, ``reset``, ``limits_changed``,
``clock_jump`` (the tenant's clock saw the server's TIME step back by more
than a second, or a gap of more than 30 s between two scripts while calls were
in flight or waiters queued: fields ``jump_ms`` (negative for a step back),
``from_ms`` (the mark before) and ``leases`` (leases alive at the mark, which age at most 30 s across the
gap, or to a retry time already promised); see "clock" in lua/lib.lua),
``limits_reseeded`` (made by the client, not a script, but appended and
published by the one-line script ``announce.lua`` the same way: a Budget given
``desired_limits`` wrote a tenant's missing limits back; fields ``limits``,
scope -> limit strings, and ``history_lost``; see `slowburn_redis.reseeding`).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

EVENT_TYPES = (
    "threshold",
    "exhausted",
    "waiting",
    "resumed",
    "overrun",
    "lease_expired",
    "reset",
    "limits_changed",
    "clock_jump",
    "limits_reseeded",
)


class Event(BaseModel):
    """One event; fields beyond these depend on the type (`level`, `waited_ms`, ...)."""

    model_config = ConfigDict(extra="allow")

    type: str
    tenant: str
    ts: int
    """Server time in milliseconds."""
    agent: str | None = None
    limit: str | None = None
    id: str | None = None
    """The event's stream id in the tenant's trail (``<ms>-<seq>``, Redis server time); None when unknown."""

    @property
    def at(self) -> datetime:
        """The server time of the event."""
        return datetime.fromtimestamp(self.ts / 1000, tz=UTC)

    @classmethod
    def from_message(cls, tenant: str, data: str | bytes) -> Event:
        """Parse a message from the event channel (its ``id`` field, when present, is the trail entry's)."""
        fields: dict[str, Any] = json.loads(data)
        if not fields.get("agent"):
            fields["agent"] = None
        fields["tenant"] = tenant
        return cls.model_validate(fields)

    @classmethod
    def from_entry(cls, tenant: str, entry_id: str, entry: dict[str, str]) -> Event:
        """Parse an entry of the trail stream: its ``event`` field, with the entry's id."""
        fields: dict[str, Any] = json.loads(entry["event"])
        if not fields.get("agent"):
            fields["agent"] = None
        fields["tenant"] = tenant
        fields["id"] = entry_id
        return cls.model_validate(fields)
