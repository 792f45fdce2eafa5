"""A limits file: tenants, their limits, the default of every agent, and per-agent limits.

YAML or TOML (chosen by the file's suffix: ``.toml`` is TOML, anything else
YAML)::

    tenants:
      acme:
        limits: ["usd 5/day", "requests 60/min", "concurrency 8"]
        every_agent: ["usd 1/hour"]          # the default of each agent ("*")
        agents:
          researcher: ["usd 0.50/hour"]

Only the scopes a file names are written: a tenant without ``every_agent``
leaves that scope as it is, and an empty list clears a scope. `load_limits_file`
validates the whole file (names, limit strings, unknown keys) before anything
is written; `LimitsFile.assignments` lists the writes in order.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slowburn_redis.errors import InvalidInput
from slowburn_redis.limits import Limit, coerce_limits
from slowburn_redis.names import EVERY_AGENT, validate_name


class InvalidConfig(InvalidInput):
    """A limits file cannot be read or does not describe valid limits."""


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
        out: list[tuple[str, str | None, list[Limit]]] = []
        for tenant, spec in self.tenants.items():
            if spec.limits is not None:
                out.append((tenant, None, spec.limits))
            if spec.every_agent is not None:
                out.append((tenant, EVERY_AGENT, spec.every_agent))
            out.extend((tenant, agent, limits) for agent, limits in spec.agents.items())
        return out


def parse_limits_text(text: str, *, toml: bool, source: str = "<text>") -> LimitsFile:
    """Parse and validate a limits document; raise InvalidConfig with a one-line reason naming `source`."""
    try:
        data = tomllib.loads(text) if toml else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise InvalidConfig(f"{source}: not valid {'TOML' if toml else 'YAML'}: {_syntax_reason(exc)}") from None
    if not isinstance(data, dict):
        raise InvalidConfig(f"{source}: expected a mapping with a 'tenants' key, found {type(data).__name__}")
    try:
        return LimitsFile.model_validate(data)
    except ValidationError as exc:
        raise InvalidConfig(f"{source}: {_first_error(exc)}") from None
    except InvalidInput as exc:
        raise InvalidConfig(f"{source}: {exc}") from None


def load_limits_file(path: str | Path) -> LimitsFile:
    """Read `path` (TOML if it ends in .toml, else YAML) and validate all of it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidConfig(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_limits_text(text, toml=path.suffix.lower() == ".toml", source=str(path))


def _syntax_reason(exc: Exception) -> str:
    """A one-line reason for a TOML or YAML syntax error, with its line and column."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    original = (error.get("ctx") or {}).get("error")
    message = str(original) if isinstance(original, Exception) else error["msg"]
    message = message.removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
