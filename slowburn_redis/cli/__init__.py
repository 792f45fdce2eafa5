"""The ``slowburn-redis`` command line: limits, status, reset, watch, report, demo, acl.

`main` is the console script; `cli` is the click group (for click's test runner).
The CLI never imports litellm.
"""

from slowburn_redis.cli.app import cli, main

__all__ = ["cli", "main"]
