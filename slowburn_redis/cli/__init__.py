"""The ``slowburn-redis`` command line: limits, status, reset, watch, report, demo, doctor, acl.

`main` is the console script; `cli` is the click group (for click's test runner).
The CLI never imports litellm. Its own dependencies (click, rich, PyYAML and the
embedded store) come with the ``[cli]`` extra; without them `main` says so in
one line and exits 2.
"""

from __future__ import annotations

import sys
from typing import Any

_CLI_DEPENDENCIES = {"click", "rich", "yaml"}

try:
    from slowburn_redis.cli.app import cli
except ModuleNotFoundError as exc:  # a lean worker install: no [cli] extra
    if (exc.name or "").partition(".")[0] not in _CLI_DEPENDENCIES:
        raise
    _missing: ModuleNotFoundError | None = exc
    cli: Any = None  # type: ignore[no-redef]
else:
    _missing = None


def main() -> None:
    """The console script entry point."""
    if _missing is not None:
        print(
            f"slowburn-redis: the command line needs the [cli] extra ({_missing.name} is not installed): "
            'pip install "slowburn-redis[cli]"',
            file=sys.stderr,
        )
        raise SystemExit(2)
    cli(prog_name="slowburn-redis")


__all__ = ["cli", "main"]
