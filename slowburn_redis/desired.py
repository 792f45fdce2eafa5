"""Declared limits: tenants, their limits, the default of every agent, and named agents' limits.

The model of a limits file (`slowburn_redis.config` reads one from YAML or
TOML) and of the desired state a `Budget` re-seeds from
(``Budget(desired_limits=...)``). Pure data and validation: no Redis, no
file formats, so a production worker can hold it without the CLI's extras.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slowburn_redis.errors import InvalidInput
from slowburn_redis.limits import Limit, coerce_limits
from slowburn_redis.names import EVERY_AGENT, validate_name


def _limits(value: Any) -> list[Limit]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"limits must be a list of strings like 'usd 5/day', not {type(value).__name__}")
    return coerce_limits(value)


class TenantLimits(BaseModel):
    """The limits of one tenant: its own, every agent's default, and named agents'."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limits: list[Limit] | None = None
    """The tenant's own limits, shared by all its agents (None: leave as they are)."""
    every_agent: list[Limit] | None = None
    """The default limits of each agent without limits of its own (None: leave as they are)."""
    agents: dict[str, list[Limit]] = Field(default_factory=dict)
    """Limits of named agents; the key ``"*"`` is the same as `every_agent`."""

    @field_validator("limits", "every_agent", mode="before")
    @classmethod
    def _parse_limits(cls, value: Any) -> Any:
        return None if value is None else _limits(value)

    @field_validator("agents", mode="before")
    @classmethod
    def _parse_agents(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"agents must be a mapping of agent name to limits, not {type(value).__name__}")
        out: dict[str, list[Limit]] = {}
        for name, limits in value.items():
            if name != EVERY_AGENT:
                validate_name("agent", name)
            out[str(name)] = _limits(limits)
        return out

    def scopes(self) -> list[tuple[str | None, list[Limit]]]:
        """The scopes this tenant declares: (None for the tenant, ``"*"``, or an agent; limits), in order."""
        out: list[tuple[str | None, list[Limit]]] = []
        if self.limits is not None:
            out.append((None, self.limits))
        if self.every_agent is not None:
            out.append((EVERY_AGENT, self.every_agent))
        out.extend(self.agents.items())
        return out

    @model_validator(mode="after")
    def _one_default(self) -> TenantLimits:
        if self.every_agent is not None and EVERY_AGENT in self.agents:
            raise ValueError("the default of every agent is given twice: as every_agent and as agents['*']")
        return self


class LimitsFile(BaseModel):
    """A whole limits file: tenant name -> TenantLimits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenants: dict[str, TenantLimits]

    @field_validator("tenants", mode="before")
    @classmethod
    def _tenant_names(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for name in value:
                validate_name("tenant", name)
                if value[name] is None:
                    raise ValueError(f"tenant {name!r} has no limits")
        return value

    def assignments(self) -> list[tuple[str, str | None, list[Limit]]]:
        """Every write the file asks for: (tenant, agent or None or "*", limits), in file order."""
        return [(tenant, agent, limits) for tenant, spec in self.tenants.items() for agent, limits in spec.scopes()]


def desired_limits(value: LimitsFile | Mapping[str, Any]) -> LimitsFile:
    """Declared limits from a `LimitsFile` or a mapping; InvalidInput (one line) for anything else.

    The mapping is tenant -> limits, where limits is a list of limit strings
    (the tenant's own limits) or a mapping with ``limits``, ``every_agent``
    and ``agents`` as in a limits file::

        {"acme": ["usd 5/day", "concurrency 8"],
         "globex": {"limits": ["usd 50/day"], "agents": {"researcher": ["usd 1/hour"]}}}
    """
    if isinstance(value, LimitsFile):
        return value
    if not isinstance(value, Mapping):
        raise InvalidInput(
            f"desired limits must be a LimitsFile or a mapping of tenant to limits, not {type(value).__name__}"
        )
    tenants = {name: {"limits": spec} if isinstance(spec, (list, tuple, str)) else spec for name, spec in value.items()}
    try:
        return LimitsFile.model_validate({"tenants": tenants})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidInput(f"desired limits: {where}: {first['msg']}") from None
