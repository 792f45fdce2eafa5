"""Hostile arguments and limits files to the CLI, on fakeredis (over TCP) and on a real Redis.

Every run exits 0 (the input was valid) or 2 with one ``Error: ...`` line on
stderr and no traceback, and a run that exits 2 leaves every key under the
prefix as it was. Arguments come after ``--`` so that a value starting with
``-`` is a value, not an unknown option (click's own usage errors print the
usage too).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slowburn_redis import Limit
from slowburn_redis.config import MAX_DEPTH
from tests.cli_support import Cli, assert_bad_input
from tests.test_fuzz_api import HOSTILE_NAMES, limit_texts

FUZZ = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")

# Command-line arguments are strings without NUL (an OS cannot pass one).
arg_text = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=20)
names = st.one_of(
    st.sampled_from([name for name in HOSTILE_NAMES if "\x00" not in name]),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,8}", fullmatch=True),
    arg_text,
)
# At least one: none at all is click's own usage error (a missing argument), multi-line by design.
limit_args = st.lists(st.one_of(limit_texts.filter(lambda text: "\x00" not in text), arg_text), min_size=1, max_size=4)


@pytest.fixture
def run(server_url: str, prefix: str) -> Cli:
    return Cli(server_url, prefix)


def seeded(run: Cli) -> None:
    """Limits and usage on ACME, so a wrong reset or set shows in the snapshot."""
    if run.snapshot():
        return
    assert run("limits", "set", "acme", "usd 5/day", "concurrency 4").exit_code == 0
    assert run("limits", "set", "--agent", "bot", "acme", "usd 1/hour").exit_code == 0


def check(run: Cli, result: Result, before: dict[str, Any], valid: bool | None) -> bool:
    """Exit 0, or exit 2 with one error line and nothing changed. Returns whether it succeeded.

    `valid` (when known) is whether the input must be accepted.
    """
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 0:
        assert valid is not False, f"bad input accepted: {result.output}"
        return True
    assert_bad_input(result)
    assert run.snapshot() == before, "a refused command changed stored state"
    assert valid is not True, f"good input refused: {result.stderr}"
    return False


def valid_name(name: str) -> bool:
    return NAME.fullmatch(name) is not None


def valid_limits(texts: list[str]) -> bool | None:
    """Whether `texts` is a valid list of limits for the CLI; None when unsure."""
    if not texts:
        return None  # click may refuse an empty LIMIT... on its own
    try:
        parsed = [Limit.parse(text) for text in texts]
    except Exception:
        return False
    return len({limit.key for limit in parsed}) == len(parsed)


@FUZZ
@given(tenant=names, agent=st.one_of(st.none(), names, st.just("*")), limits=limit_args)
def test_limits_set_with_hostile_arguments(run: Cli, tenant: str, agent: str | None, limits: list[str]) -> None:
    seeded(run)
    before = run.snapshot()
    options = [] if agent is None else ["--agent", agent]
    result = run("limits", "set", *options, "--", tenant, *limits)
    names_ok = valid_name(tenant) and (agent is None or agent == "*" or valid_name(agent))
    lims = valid_limits(limits)
    expected = None if lims is None else (names_ok and lims)
    if check(run, result, before, expected):
        shown = run("limits", "show", "--json", "--", tenant)
        assert shown.exit_code == 0, shown.output


@FUZZ
@given(
    command=st.sampled_from(["reset", "status", "limits show", "limits clear"]),
    tenant=names,
    agent=st.one_of(st.none(), names, st.just("*")),
    dimension=st.one_of(st.none(), st.sampled_from(["usd", "tokens", "concurrency", "USD", "*", ""]), arg_text),
)
def test_reset_status_show_clear_with_hostile_arguments(
    run: Cli, command: str, tenant: str, agent: str | None, dimension: str | None
) -> None:
    seeded(run)
    before = run.snapshot()
    options = [] if agent is None else ["--agent", agent]
    if command == "reset":
        options += ["--yes"] + ([] if dimension is None else ["--dimension", dimension])
    result = run(*command.split(), *options, "--", tenant)
    if not valid_name(tenant):
        assert result.exit_code == 2, (command, tenant, result.output)
    if result.exit_code == 3:  # not found: only status names a tenant it cannot find; one line, nothing changed
        assert command == "status" and tenant != "acme", (command, tenant)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "no such tenant" in lines[0] and result.stdout == ""
        assert run.snapshot() == before
        return
    if check(run, result, before, None) and command in ("status", "limits show"):
        assert run.snapshot() == before, f"{command} changed stored state"


yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), arg_text, limit_texts),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.one_of(names, arg_text), inner, max_size=3)
    ),
    max_leaves=12,
)
limits_files = st.one_of(
    st.builds(
        lambda tenants: {"tenants": tenants},
        st.dictionaries(
            names,
            st.fixed_dictionaries(
                {},
                optional={
                    "limits": st.one_of(st.lists(limit_texts, max_size=3), yaml_values),
                    "every_agent": st.lists(limit_texts, max_size=2),
                    "agents": st.dictionaries(names, st.lists(limit_texts, max_size=2), max_size=2),
                    "extra": yaml_values,
                },
            ),
            max_size=3,
        ),
    ),
    yaml_values,
)


@FUZZ
@given(
    content=st.one_of(
        limits_files.map(lambda data: yaml.safe_dump(data, allow_unicode=True)),
        arg_text,
        st.binary(max_size=40),
        st.sampled_from(["", "tenants:", "tenants: []", "tenants: {acme: {limits: [usd]}}", "{{{{", "\t- x"]),
    ),
    suffix=st.sampled_from([".yaml", ".toml", ".yml", ".txt"]),
)
def test_limits_apply_with_hostile_files(run: Cli, content: str | bytes, suffix: str) -> None:
    seeded(run)
    before = run.snapshot()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / ("limits" + suffix)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        result = run("limits", "apply", str(path))
    check(run, result, before, None)


def test_a_valid_limits_file_is_applied(run: Cli, tmp_path: Path) -> None:
    """The fuzz above can only pass if a valid file is accepted too."""
    path = tmp_path / "limits.yaml"
    path.write_text(
        yaml.safe_dump({"tenants": {"globex": {"limits": ["usd 2/day"], "agents": {"bot": ["tokens 5k"]}}}})
    )
    before = run.snapshot()
    result = run("limits", "apply", str(path))
    assert result.exit_code == 0, result.output
    assert run.snapshot() != before


openers = st.sampled_from(["[", "{a: ", "- ", "{"])


@FUZZ
@given(
    depth=st.integers(min_value=MAX_DEPTH + 1, max_value=3000),
    opener=openers,
    closed=st.booleans(),
    suffix=st.sampled_from([".yaml", ".yml"]),
)
def test_deep_yaml_is_refused_in_one_line(run: Cli, depth: int, opener: str, closed: bool, suffix: str) -> None:
    seeded(run)
    before = run.snapshot()
    closer = {"[": "]", "{a: ": "}", "{": "}", "- ": ""}[opener]
    body = opener * depth + (closer * depth if closed else "")
    if opener == "- ":  # block sequences nest by indentation
        body = "".join("  " * i + "-\n" for i in range(depth))
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / ("limits" + suffix)
        path.write_text("tenants: " + body if opener != "- " else "tenants:\n" + body, encoding="utf-8")
        result = run("limits", "apply", str(path))
    assert not check(run, result, before, False)
    assert result.stdout == ""


@FUZZ
@given(
    tenants=st.lists(st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True), min_size=1, max_size=5),
    repeat=st.integers(min_value=0, max_value=4),
    toml=st.booleans(),
)
def test_a_tenant_given_twice_is_refused(run: Cli, tenants: list[str], repeat: int, toml: bool) -> None:
    seeded(run)
    before = run.snapshot()
    names = [*tenants, tenants[repeat % len(tenants)]]  # one name given twice, wherever it falls
    if toml:
        text = "".join(f'[tenants.{name}]\nlimits = ["usd {i + 1}/day"]\n' for i, name in enumerate(names))
    else:
        text = "tenants:\n" + "".join(f'  {name}:\n    limits: ["usd {i + 1}/day"]\n' for i, name in enumerate(names))
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / ("limits.toml" if toml else "limits.yaml")
        path.write_text(text, encoding="utf-8")
        result = run("limits", "apply", str(path))
    assert not check(run, result, before, False)
    assert result.stdout == ""
