"""Hostile limits files and arguments, round two: each ends in exit 2 and ONE line, nothing written.

On fakeredis (over TCP) and a real Redis. The cases that ran away before
(an alias bomb past 3 GB, /dev/zero, a FIFO that blocked for ever, a
1M-tenant TOML) run in a subprocess with an address-space limit and a
timeout, so that a regression fails the test instead of taking the machine
with it.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result

from slowburn_redis.config import MAX_DEPTH, MAX_FILE_BYTES, MAX_TENANTS
from tests.cli_support import Cli, assert_exit

BOMB = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)),
        "tenants: {acme: {limits: *i}}",
    ]
)
"""About 560 bytes that expand to 9^9 strings."""

GOOD = 'tenants:\n  acme:\n    limits: ["usd 9/day"]\n'


@pytest.fixture
def run(server_url: str, prefix: str) -> Cli:
    cli = Cli(server_url, prefix)
    assert_exit(cli("limits", "set", "acme", "usd 5/day", "concurrency 4"))
    assert_exit(cli("limits", "set", "--agent", "bot", "acme", "usd 1/hour"))
    return cli


def one_line_exit_2(result: Result, *words: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stdout == ""
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ") and "Traceback" not in result.output
    for word in words:
        assert word in lines[0], (word, lines[0])


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


CASES: list[tuple[str, Callable[[Path], Path], list[str]]] = [
    ("deep-yaml", lambda d: write(d / "deep.yaml", "tenants: " + "[" * 20_000), ["nested deeper than"]),
    ("deep-closed", lambda d: write(d / "deep.yaml", "tenants: " + "[" * 5000 + "]" * 5000), ["nested deeper"]),
    ("deep-mapping", lambda d: write(d / "deep.yaml", "tenants: " + "{a: " * 5000), ["nested deeper"]),
    ("deep-toml", lambda d: write(d / "deep.toml", "x = " + "[" * 20_000), ["not valid TOML"]),
    ("alias", lambda d: write(d / "alias.yaml", 'x: &l ["usd 1/day"]\ntenants: {acme: {limits: *l}}\n'), ["aliases"]),
    (
        "duplicate-tenant-yaml",
        lambda d: write(d / "dup.yaml", GOOD + '  acme:\n    limits: ["usd 1/day"]\n'),
        ["'acme' is given twice", "line 4"],
    ),
    (
        "duplicate-agent-yaml",
        lambda d: write(d / "dup.yaml", 'tenants:\n  acme:\n    agents: {bot: ["usd 1/day"], bot: []}\n'),
        ["'bot' is given twice"],
    ),
    (
        "duplicate-key-yaml",
        lambda d: write(d / "dup.yaml", 'tenants:\n  acme:\n    limits: ["usd 1/day"]\n    limits: []\n'),
        ["'limits' is given twice"],
    ),
    (
        "duplicate-tenant-toml",
        lambda d: write(d / "dup.toml", '[tenants.acme]\nlimits = ["usd 1/day"]\n[tenants.acme]\nlimits = []\n'),
        ["not valid TOML"],
    ),
    (
        "duplicate-key-toml",
        lambda d: write(d / "dup.toml", '[tenants.acme]\nlimits = ["usd 1/day"]\nlimits = []\n'),
        ["not valid TOML"],
    ),
    ("too-big", lambda d: write(d / "big.yaml", GOOD + "#" * MAX_FILE_BYTES), ["larger than"]),
    (
        "too-many-tenants",
        lambda d: write(d / "many.toml", "".join(f"[tenants.t{i}]\nlimits=[]\n" for i in range(MAX_TENANTS + 1))),
        ["tenants, more than"],
    ),
    ("directory", lambda d: d, ["not a regular file"]),
    ("not-utf8", lambda d: (d / "latin.yaml", (d / "latin.yaml").write_bytes(b"tenants: {\xe9: 1}"))[0], ["UTF-8"]),
    ("missing", lambda d: d / "nope.yaml", ["cannot read", "nope.yaml"]),
]


@pytest.mark.parametrize(("case", "make", "words"), CASES, ids=[c[0] for c in CASES])
def test_hostile_files_are_refused_in_one_line(
    run: Cli, tmp_path: Path, case: str, make: Callable[[Path], Path], words: list[str]
) -> None:
    path = make(tmp_path)
    before = run.snapshot()
    for args in (["limits", "apply"], ["limits", "apply", "--dry-run"], ["limits", "apply", "--prune"]):
        one_line_exit_2(run(*args, str(path)), *words)
    assert run.snapshot() == before


def test_nesting_within_the_bound_is_still_yaml(run: Cli, tmp_path: Path) -> None:
    """The bound refuses only what is deeper than a limits file could need."""
    assert MAX_DEPTH >= 8
    path = write(tmp_path / "ok.yaml", 'tenants:\n  acme:\n    agents:\n      bot: [["usd 1/day"]]\n')
    result = run("limits", "apply", str(path))
    one_line_exit_2(result, "tenants.acme")  # a list inside a list is a bad limit, said as such


def _limited() -> None:  # pragma: no cover - runs in the child
    two_gb = 2 << 30
    resource.setrlimit(resource.RLIMIT_AS, (two_gb, two_gb))


def cli_process(run: Cli, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in its own process with at most 2 GB of address space; the timeout only guards against a hang."""
    command = [sys.executable, "-m", "slowburn_redis.cli", "--redis-url", run.url, "--prefix", run.prefix, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, preexec_fn=_limited, check=False)


def fifo(directory: Path) -> Path:
    path = directory / "limits.yaml"
    os.mkfifo(path)
    return path


RUNAWAY: list[tuple[str, Callable[[Path], Path], str]] = [
    ("alias-bomb", lambda d: write(d / "bomb.yaml", BOMB), "aliases"),
    ("dev-zero", lambda d: Path("/dev/zero"), "not a regular file"),
    ("fifo", fifo, "not a regular file"),
    (
        "million-tenants",
        lambda d: write(d / "huge.toml", "".join(f'[tenants.t{i}]\nlimits = ["usd 1/day"]\n' for i in range(10**6))),
        "larger than",
    ),
]


@pytest.mark.parametrize(("case", "make", "word"), RUNAWAY, ids=[c[0] for c in RUNAWAY])
def test_files_that_ran_away_are_refused_at_once(
    run: Cli, tmp_path: Path, case: str, make: Callable[[Path], Path], word: str
) -> None:
    assert len(BOMB) < 600
    path = make(tmp_path)
    before = run.snapshot()
    done = cli_process(run, "limits", "apply", str(path))
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr[-2000:])
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and word in lines[0], done.stderr[-2000:]
    assert run.snapshot() == before


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["--redis-url", "redis://h:99999/0", "status"], "Port out of range"),
        (["--redis-url", "redis://user:secret@h:99999/0", "limits", "set", "acme", "usd 1/day"], "Port out of range"),
        (["--redis-url", "redis://h:6379/notanumber", "status"], "database must be a number"),
        (["--redis-url", "redis://h:99999/0", "doctor"], "Port out of range"),
        (["demo", "--workers", "1000000"], "--workers"),
        (["demo", "--processes", "33", "--workers", "40"], "--processes"),
        (["demo", "--calls", "10000000"], "--calls"),
        (["demo", "--seconds", "1e12"], "--seconds"),
    ],
)
def test_hostile_arguments_are_one_line_exit_2(run: Cli, args: list[str], word: str) -> None:
    before = run.snapshot()
    done = cli_process(run, *args)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr[-2000:])
    assert done.stdout == "" and "Traceback" not in done.stderr and "secret" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and word in lines[0], done.stderr
    assert run.snapshot() == before
