"""Events published on a tenant's event channel by the scripts.

Types: ``threshold`` (50/75/90/100 % of a limit, once per crossing),
``exhausted`` (a request was denied by a spent limit), ``waiting``,
``resumed``, ``overrun``, ``lease_expired``, ``reset``, ``limits_changed``,
``clock_jump`` (the tenant's clock saw the server's TIME step back by more
than a second, or a gap of more than 30 s between two scripts while calls were
in flight or waiters queued: fields ``jump_ms`` (negative for a step back),
``from_ms`` (the mark before) and ``leases`` (leases alive at the mark, which age at most 30 s across the
gap, or to a retry time already promised); see "clock" in lua/lib.lua),
``limits_reseeded`` (published by the client, not a script: a Budget given
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

    @property
    def at(self) -> datetime:
        """The server time of the event."""
        return datetime.fromtimestamp(self.ts / 1000, tz=UTC)

    @classmethod
    def from_message(cls, tenant: str, data: str | bytes) -> Event:
        """Parse a message from the event channel."""
        fields: dict[str, Any] = json.loads(data)
        if not fields.get("agent"):
            fields["agent"] = None
        fields["tenant"] = tenant
        return cls.model_validate(fields)
