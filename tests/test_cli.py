"""The slowburn-redis group: global options, exit codes for an unreachable Redis, SCAN not KEYS, acl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis.asyncio
from click.testing import CliRunner

from slowburn_redis import __version__
from slowburn_redis.acl import acl_rules
from slowburn_redis.cli import cli
from tests.cli_support import Cli, assert_bad_input, assert_exit
from tests.servers import free_port


def test_version_and_help() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert_exit(result)
    assert result.stdout.strip() == f"slowburn-redis, version {__version__}"
    help_text = CliRunner().invoke(cli, ["--help"]).stdout
    for command in ("limits", "status", "reset", "watch", "report", "demo", "acl", "doctor"):
        assert command in help_text
    for name, command in cli.commands.items():  # every command has a help text that renders
        assert_exit(CliRunner().invoke(cli, [name, "--help"]))
        assert command.help


def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    @cli.command("_probe", hidden=True)
    def probe() -> None:
        from click import get_current_context

        from slowburn_redis.cli.runtime import state

        seen["state"] = state(get_current_context())

    try:
        assert_exit(CliRunner().invoke(cli, ["_probe"]))
        assert seen["state"].redis_url == "redis://localhost:6379/0" and seen["state"].prefix == "sb"
        assert not seen["state"].url_given
        monkeypatch.setenv("SLOWBURN_REDIS_URL", "redis://example:6380/2")
        monkeypatch.setenv("SLOWBURN_PREFIX", "p1")
        assert_exit(CliRunner().invoke(cli, ["_probe"]))
        assert (seen["state"].redis_url, seen["state"].prefix) == ("redis://example:6380/2", "p1")
        assert seen["state"].url_given  # named in the environment: the demo uses it too
        assert_exit(CliRunner().invoke(cli, ["--redis-url", "redis://h/0", "_probe"]))
        assert seen["state"].url_given
    finally:
        cli.commands.pop("_probe")


READING_AND_WRITING = [
    ["limits", "set", "acme", "usd 5/day"],
    ["limits", "show", "acme"],
    ["limits", "show", "acme", "--json"],
    ["limits", "clear", "acme"],
    ["status"],
    ["status", "acme", "--json"],
    ["reset", "acme", "--yes"],
    ["watch", "acme", "--once"],
    ["report", "acme"],
    ["doctor"],
]


@pytest.mark.parametrize("args", READING_AND_WRITING, ids=lambda a: " ".join(a))
def test_unreachable_redis_is_exit_1_naming_the_url_without_credentials(args: list[str]) -> None:
    port = free_port()
    url = f"redis://admin:s3cret@127.0.0.1:{port}/0"
    result = CliRunner().invoke(cli, ["--redis-url", url, *args])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"redis://127.0.0.1:{port}/0" in lines[0]
    assert "s3cret" not in result.output and "admin" not in result.output
    assert "Traceback" not in result.output


def test_apply_on_unreachable_redis(tmp_path: Path) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text("tenants:\n  acme:\n    limits: [usd 5/day]\n")
    result = CliRunner().invoke(
        cli, ["--redis-url", f"redis://:pw@127.0.0.1:{free_port()}/0", "limits", "apply", str(path)]
    )
    assert result.exit_code == 1 and "pw" not in result.output


def test_bad_url_and_prefix_are_bad_usage() -> None:
    assert_bad_input(CliRunner().invoke(cli, ["--redis-url", "http://user:pw@host/0", "status"]), "redis://")
    assert "pw" not in CliRunner().invoke(cli, ["--redis-url", "http://user:pw@host/0", "status"]).output
    assert_bad_input(CliRunner().invoke(cli, ["--prefix", "a:b", "status"]), "prefix name")


def test_tenants_are_found_with_scan_never_keys(server_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run = Cli(server_url, prefix)
    names = [f"tenant{i:03d}" for i in range(30)]
    for name in names:
        assert_exit(run("limits", "set", name, "requests 5/min"))

    def no_keys(*args: object, **kwargs: object) -> None:
        raise AssertionError("KEYS blocks the server: use SCAN")

    monkeypatch.setattr(redis.asyncio.Redis, "keys", no_keys)
    result = run("status", "--json")
    assert_exit(result)
    assert [s["tenant"] for s in json.loads(result.stdout)] == names
    other = Cli(server_url, prefix + "x")  # another prefix sees none of them
    assert json.loads(other("status", "--json").stdout) == []


def test_acl_prints_the_rules(prefix: str) -> None:
    run = Cli("redis://localhost:6379/0", prefix)
    result = run("acl", "acme")
    assert_exit(result)
    assert result.stdout.splitlines() == acl_rules("acme", prefix=prefix)
    assert result.stdout.startswith(f"ACL SETUSER {prefix}-worker-acme ")
    named = run("acl", "acme", "--worker-user", "w1", "--admin-user", "a1", "--json")
    assert json.loads(named.stdout) == acl_rules("acme", prefix=prefix, worker_user="w1", admin_user="a1")
    assert_bad_input(run("acl", "ac{me"), "tenant name")
    assert_bad_input(run("acl", "acme", "--worker-user", "same", "--admin-user", "same"), "different")
