"""Helpers for the CLI tests: run the click group against one store and prefix, snapshot its keys."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from click.testing import CliRunner, Result

from slowburn_redis.cli import cli


@dataclass
class Cli:
    """``slowburn-redis --redis-url URL --prefix PREFIX ...`` through click's runner."""

    url: str
    prefix: str
    env: dict[str, str] | None = None
    """Extra environment for the command (e.g. ``{"COLUMNS": "80"}``)."""

    def __call__(self, *args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(
            cli, ["--redis-url", self.url, "--prefix", self.prefix, *args], input=input, env=self.env
        )

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)

    def snapshot(self) -> dict[str, Any]:
        """Every key under the prefix with its type and content, to show that nothing changed."""
        client = self.client()
        out: dict[str, Any] = {}
        for key in sorted(client.scan_iter(match=f"{self.prefix}:*")):
            kind = client.type(key)
            if kind == "hash":
                value: Any = client.hgetall(key)
            elif kind == "string":
                value = client.get(key)
            elif kind == "set":
                value = sorted(client.smembers(key))
            elif kind == "zset":
                value = client.zrange(key, 0, -1, withscores=True)
            elif kind == "stream":
                value = client.xlen(key)
            else:
                value = kind
            out[key] = (kind, value)
        client.close()
        return out


def assert_bad_input(result: Result, *words: str) -> None:
    """Exit 2 with one line on stderr naming the problem (each of `words`), and no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], (word, lines[0])


def assert_exit(result: Result, code: int = 0) -> None:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)


def args_of(*parts: Sequence[str]) -> list[str]:
    return [p for part in parts for p in part]
