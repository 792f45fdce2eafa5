"""Validation of tenant, agent and prefix names (the keys built from them: `slowburn_redis.keys`).

Names are restricted to ``[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}``: no name can
contain ``{``, ``}``, ``:``, ``|``, spaces or glob characters, so no name can
leave its hash tag, its key, or the separators the Lua scripts parse.
"""

from __future__ import annotations

import re

from slowburn_redis.errors import InvalidName

MAX_NAME_LENGTH = 64
EVERY_AGENT = "*"
"""Pass as ``agent`` to ``set_limits``/``get_limits`` for the default of every agent."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]*")


def validate_name(kind: str, value: object) -> str:
    """Return `value` if it is a valid `kind` name ("tenant", "agent"), else raise InvalidName."""
    return _checked(kind, value, _NAME, MAX_NAME_LENGTH, "_ . @ -")


MAX_MODEL_LENGTH = 128
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@+-]*", re.ASCII)


def validate_model(model: object) -> str:
    """Return `model` if it can name a per-model scope (``gpt-4o``, ``openai/gpt-4o-mini``), else InvalidName.

    Model names may hold letters, digits and ``_ . : / @ + -`` (no spaces,
    braces or ``|``), at most 128 characters.
    """
    return _checked("model", model, _MODEL, MAX_MODEL_LENGTH, "_ . : / @ + -")


def _checked(kind: str, value: object, pattern: re.Pattern[str], max_length: int, punctuation: str) -> str:
    """`value` if it is a non-empty string of at most `max_length` that `pattern` matches whole, else InvalidName."""
    if not isinstance(value, str):
        raise InvalidName(f"{kind} name must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidName(f"{kind} name must not be empty")
    if len(value) > max_length:
        raise InvalidName(f"{kind} name is {len(value)} characters long; at most {max_length}")
    if not pattern.fullmatch(value):
        raise InvalidName(
            f"{kind} name {value!r} may hold only letters, digits and {punctuation} (and start with a letter or digit)"
        )
    return value


def validate_agent(agent: str | None) -> str | None:
    """Validate an optional agent name."""
    return None if agent is None else validate_name("agent", agent)
