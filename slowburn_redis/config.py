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

Hostile files are refused with `InvalidConfig` (one line) before any write and
without running away with memory or time: only regular files are read (never
a FIFO, a device such as /dev/zero, or a directory, and the open never
blocks), at most `MAX_FILE_BYTES`; YAML may nest at most `MAX_DEPTH` levels
and may not use aliases (``*name``: the way to an expansion bomb); a key given
twice in one mapping (two ``acme:`` tenants, say) is an error, in YAML as in
TOML; a file holds at most `MAX_TENANTS` tenants and `MAX_SCOPES` scopes.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.nodes import MappingNode, Node

from slowburn_redis.desired import LimitsFile, TenantLimits
from slowburn_redis.errors import InvalidInput

__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_SCOPES",
    "MAX_TENANTS",
    "InvalidConfig",
    "LimitsFile",
    "TenantLimits",
    "load_limits_file",
    "parse_limits_text",
    "read_regular_file",
]

MAX_FILE_BYTES = 1 << 20
"""A limits file is at most 1 MiB (a thousand tenants with a dozen scopes each take about 100 kB)."""
MAX_DEPTH = 16
"""How deeply a YAML document may nest (a limits file needs 5 levels)."""
MAX_TENANTS = 10_000
"""Tenants in one file."""
MAX_SCOPES = 100_000
"""Scopes (tenant, every-agent and agent limit lists) in one file."""


class InvalidConfig(InvalidInput):
    """A limits file cannot be read or does not describe valid limits."""


class _Refused(yaml.YAMLError):
    """A YAML document this loader will not build: too deep, an alias, a duplicate key."""


class _LimitsLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases, nesting past MAX_DEPTH and duplicate mapping keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise _Refused(f"YAML aliases (*name) are not allowed in a limits file (line {mark.line + 1})")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class says so
                break
            if duplicate:
                line = key_node.start_mark.line + 1
                raise _Refused(f"key {str(key)[:80]!r} is given twice in one mapping (line {line})")
        return super().construct_mapping(node, deep=deep)


def parse_limits_text(text: str, *, toml: bool, source: str = "<text>") -> LimitsFile:
    """Parse and validate a limits document; raise InvalidConfig with a one-line reason naming `source`."""
    if len(text) > MAX_FILE_BYTES:
        raise InvalidConfig(f"{source}: larger than {MAX_FILE_BYTES} bytes")
    kind = "TOML" if toml else "YAML"
    try:
        data = tomllib.loads(text) if toml else _load_yaml(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise InvalidConfig(f"{source}: not valid {kind}: {_syntax_reason(exc)}") from None
    except RecursionError:  # a backstop: YAML nesting is bounded above, TOML's parser recurses on arrays
        raise InvalidConfig(f"{source}: not valid {kind}: nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidConfig(f"{source}: expected a mapping with a 'tenants' key, found {type(data).__name__}")
    _check_size(data, source)
    try:
        return LimitsFile.model_validate(data)
    except ValidationError as exc:
        raise InvalidConfig(f"{source}: {_first_error(exc)}") from None
    except InvalidInput as exc:
        raise InvalidConfig(f"{source}: {exc}") from None


def _load_yaml(text: str) -> Any:
    loader = _LimitsLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _check_size(data: dict[str, Any], source: str) -> None:
    """Refuse more than MAX_TENANTS tenants or MAX_SCOPES scopes before validating any of them."""
    tenants = data.get("tenants")
    if not isinstance(tenants, dict):
        return
    if len(tenants) > MAX_TENANTS:
        raise InvalidConfig(f"{source}: {len(tenants)} tenants, more than the {MAX_TENANTS} a file may hold")
    scopes = sum(1 + len(spec.get("agents") or ()) for spec in tenants.values() if isinstance(spec, dict))
    if scopes > MAX_SCOPES:
        raise InvalidConfig(f"{source}: more than the {MAX_SCOPES} scopes a file may hold")


def read_regular_file(path: str | Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes, else InvalidConfig.

    FIFOs, devices (/dev/zero), sockets and directories are refused from
    ``os.stat`` before opening; the open is non-blocking and checked again on
    the open descriptor (the path may have changed in between), and at most
    `limit` + 1 bytes are ever read.
    """
    shown = str(path)[:200]
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise InvalidConfig(f"cannot read {shown}: not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise InvalidConfig(f"cannot read {shown}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidConfig(f"cannot read {shown}: not a regular file")
        if info.st_size > limit:
            raise InvalidConfig(f"cannot read {shown}: larger than {limit} bytes")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise InvalidConfig(f"cannot read {shown}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise InvalidConfig(f"cannot read {shown}: larger than {limit} bytes")
    return b"".join(chunks)


def load_limits_file(path: str | Path) -> LimitsFile:
    """Read `path` (TOML if it ends in .toml, else YAML) and validate all of it; InvalidConfig if anything is off."""
    path = Path(path)
    data = read_regular_file(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidConfig(f"cannot read {str(path)[:200]}: not UTF-8 text (at byte {exc.start})") from None
    return parse_limits_text(text, toml=path.suffix.lower() == ".toml", source=str(path)[:200])


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
