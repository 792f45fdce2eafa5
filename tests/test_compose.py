"""docker-compose.yml and the Dockerfile: no Docker engine here, so check what can be checked.

The file parses, names official images that exist, persists Redis with the
AOF, runs several worker replicas, and every command it runs exists: the
example's own argument parser accepts the worker's arguments and the CLI
group resolves and parses the watch command.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import pytest
import yaml

from slowburn_redis.cli import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def load_example(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_redis_7_with_append_only_persistence(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert re.fullmatch(r"redis:7(\.\d+){0,2}(-alpine|-bookworm)?", redis["image"])
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] in ("everysec", "always")
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert "redis-data" in compose["volumes"]


def test_images_are_built_from_python_3_11_slim(compose: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.MULTILINE)
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), path
    for name in ("worker", "watch"):
        assert compose["services"][name]["build"] == "."
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["slowburn-redis"] == "slowburn_redis.cli:main"


def test_workers_run_the_fleet_example(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert worker["deploy"]["replicas"] >= 2
    python, script, *args = worker["command"]
    assert python == "python" and (ROOT / script).is_file()
    parsed = load_example(ROOT / script).build_parser().parse_args(args)
    assert parsed.seconds == 0  # runs until stopped
    assert worker["environment"]["SLOWBURN_REDIS_URL"] == "redis://redis:6379/0"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_watch_runs_a_cli_command_that_exists(compose: dict[str, Any]) -> None:
    watch = compose["services"]["watch"]
    program, *args = watch["command"]
    assert program == "slowburn-redis"
    name, *rest = args
    context = click.Context(cli, info_name=program)
    command = cli.get_command(context, name)
    assert name == "watch" and isinstance(command, click.Command)
    sub = command.make_context(name, rest, parent=context)
    assert sub.params["tenant"] == "fleet"
    assert watch["environment"]["SLOWBURN_REDIS_URL"] == "redis://redis:6379/0"
