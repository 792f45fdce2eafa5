"""`Budget.quote`: would an acquire fit now, which limit would deny it, and when would it fit?

A quote is read on the server in one script call (``lua/quote.lua``), with
the same verdict code as an acquire (``check`` in ``lua/lib.lua``) at the
same instant, and changes nothing: no charge, no queue place, no event.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel

from slowburn_redis import protocol
from slowburn_redis.errors import LimitsMissing
from slowburn_redis.keys import describe_limit_key
from slowburn_redis.limits import from_units
from slowburn_redis.runs import run_cap_words

Reason = Literal["capacity", "queue", "too_large", "run"]


class Quote(BaseModel):
    """The answer to "can I afford this now?" for one request (amounts in people's units: usd in dollars).

    `admitted` says whether an acquire in ``wait`` mode sent at this instant
    would be admitted at once. When not, `limit` names the limit that would
    deny it in words (``usd 0.5/hour (agent researcher)``) and `reason` says
    why: ``capacity`` (the limit is spent), ``queue`` (waiters of the same or
    a higher priority are ahead), ``too_large`` (larger than the limit
    itself: it never fits) or ``run`` (the current run's cap or time is spent:
    an acquire would raise RunExhausted; it never fits in this run). `retry_in` is the number of seconds until the
    spent limits will have room, exact to the bucket (0 when admitted; None
    when only a settlement, a reset or the waiters ahead can make room, or
    never).
    """

    tenant: str
    agent: str | None
    model: str | None
    amounts: dict[str, float]
    admitted: bool
    reason: Reason | None = None
    limit: str | None = None
    """The denying limit in words."""
    limit_key: str | None = None
    """The denying limit's internal key (for programs; people read `limit`)."""
    retry_in: float | None = None
    at: datetime
    """The server time the quote was read at."""

    def __str__(self) -> str:
        who = self.tenant + (f" (agent {self.agent})" if self.agent else "")
        if self.admitted:
            return f"{who}: fits now"
        if self.reason == "too_large":
            return f"{who}: never fits: larger than {self.limit} itself"
        if self.reason == "run":
            return f"{who}: never fits in this run: {self.limit} is spent"
        when = "unknown (waits for a settlement or a reset)" if self.retry_in is None else f"in {self.retry_in:g}s"
        ahead = "waiters ahead on" if self.reason == "queue" else "spent:"
        return f"{who}: does not fit now ({ahead} {self.limit}); fits {when}"


def quote_from_reply(
    reply: list[object],
    *,
    tenant: str,
    agent: str | None,
    model: str | None,
    estimate: dict[str, int],
    run_id: str | None = None,
) -> Quote:
    """Decode a quote.lua reply (see its header); LimitsMissing for ``{-2, agent}``."""
    amounts = {dim: from_units(dim, units) for dim, units in estimate.items()}
    common = {"tenant": tenant, "agent": agent, "model": model, "amounts": amounts}
    code = int(str(reply[0]))
    if code == -2:
        scope = f"tenant {tenant!r}" + (f" (agent {agent})" if agent else "")
        raise LimitsMissing(
            f"no limits are stored for {scope}: refused (set them, or store 'unlimited' deliberately)",
            tenant=tenant,
            agent=agent,
        )
    if code == -3:
        spent = protocol.RunSpent(
            str(reply[1]), str(reply[2]), int(str(reply[3])), int(str(reply[4])), int(str(reply[5]))
        )
        return Quote(
            **common,
            admitted=False,
            reason="run",
            limit=run_cap_words(spent, run_id or ""),
            limit_key=spent.limit_key,
            at=datetime.now(UTC),
        )
    if code == -1:
        too_large = protocol.TooLarge(str(reply[1]), int(str(reply[2])), int(str(reply[3])))
        return Quote(
            **common,
            admitted=False,
            reason="too_large",
            limit=describe_limit_key(too_large.limit_key, too_large.amount),
            limit_key=too_large.limit_key,
            at=datetime.now(UTC),
        )
    now_ms = int(str(reply[1]))
    at = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
    if code == 1:
        return Quote(**common, admitted=True, retry_in=0.0, at=at)
    retry_at, limit_key, reason, amount = int(str(reply[2])), str(reply[3]), str(reply[4]), int(str(reply[5]))
    return Quote(
        **common,
        admitted=False,
        reason="queue" if reason == "queue" else "capacity",
        limit=describe_limit_key(limit_key, amount),
        limit_key=limit_key,
        retry_in=None if retry_at < 0 else max(0.0, (retry_at - now_ms) / 1000),
        at=at,
    )
