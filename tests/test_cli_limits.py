"""`slowburn-redis limits set/show/clear/apply` on fakeredis (TCP) and a real Redis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slowburn_redis import Budget
from slowburn_redis.keys import scope_field
from tests.cli_support import Cli, assert_bad_input, assert_exit


@pytest.fixture
def run(server_url: str, prefix: str) -> Cli:
    return Cli(server_url, prefix)


def show_json(run: Cli, tenant: str, *extra: str) -> dict[str, object]:
    result = run("limits", "show", tenant, "--json", *extra)
    assert_exit(result)
    data: dict[str, object] = json.loads(result.stdout)
    return data


def limit_texts(data: dict[str, object]) -> dict[str | None, list[str]]:
    out: dict[str | None, list[str]] = {}
    for scope in data["scopes"]:  # type: ignore[attr-defined]
        out[scope["agent"]] = [f"{lim['dimension']} {lim['amount']} {lim['window']}" for lim in scope["limits"]]
    return out


def test_set_then_show_every_scope(run: Cli) -> None:
    assert_exit(run("limits", "set", "acme", "usd 5/day", "requests 60/min"))
    assert_exit(run("limits", "set", "acme", "--agent", "*", "usd 1/hour"))
    result = run("limits", "set", "acme", "--agent", "researcher", "usd", "0.50/hour", "concurrency", "2")
    assert_exit(result)
    assert "agent researcher limits set: usd 0.5/hour, concurrency 2" in result.stdout

    data = show_json(run, "acme")
    assert data["tenant"] == "acme"
    assert limit_texts(data) == {
        None: ["usd 5 86400.0", "requests 60 60.0"],
        "*": ["usd 1 3600.0"],
        "researcher": ["usd 0.5 3600.0", "concurrency 2 None"],
    }
    assert limit_texts(show_json(run, "acme", "--agent", "researcher")) == {
        "researcher": ["usd 0.5 3600.0", "concurrency 2 None"]
    }

    table = run("limits", "show", "acme")
    assert_exit(table)
    for text in ("usd 5/day", "requests 60/min", "every agent (*)", "usd 1/hour", "agent researcher", "concurrency 2"):
        assert text in table.stdout


def test_set_replaces_and_clear_removes(run: Cli) -> None:
    assert_exit(run("limits", "set", "acme", "usd 5/day"))
    assert_exit(run("limits", "set", "acme", "tokens 1M/hour"))
    assert limit_texts(show_json(run, "acme")) == {None: ["tokens 1000000 3600.0"]}
    assert_exit(run("limits", "set", "acme", "--agent", "bot", "requests 10/min"))
    result = run("limits", "clear", "acme")
    assert_exit(result)
    assert "tenant limits cleared" in result.stdout
    assert limit_texts(show_json(run, "acme")) == {"bot": ["requests 10 60.0"]}
    assert_exit(run("limits", "clear", "acme", "--agent", "bot"))
    assert show_json(run, "acme") == {"tenant": "acme", "scopes": []}
    assert "no limits set" in run("limits", "show", "acme").stdout


def test_unlimited_is_stored_deliberately_and_admits(run: Cli, server_url: str, prefix: str) -> None:
    from slowburn_redis import Budget, LimitsMissing

    twin = Budget.from_url(server_url, prefix=prefix).sync()
    try:
        with pytest.raises(LimitsMissing):
            twin.acquire("acme", usd=5)
        result = run("limits", "unlimited", "acme")
        assert_exit(result)
        assert "acme: tenant is unlimited" in result.stdout
        twin.acquire("acme", usd=5).commit()
        assert_exit(run("limits", "clear", "acme"))
        with pytest.raises(LimitsMissing):
            twin.acquire("acme", usd=5)
    finally:
        twin.close()


@pytest.mark.parametrize(
    ("limit", "words"),
    [
        ("usd five/day", ["bad amount", "five"]),
        ("gold9 5/day", ["unknown dimension", "gold9"]),
        ("usd -5/day", ["-5"]),
        ("usd 5/fortnight", ["bad window", "fortnight"]),
        ("usd", ["bad limit", "usd"]),
        ("concurrency 2/min", ["concurrency"]),
    ],
)
def test_bad_limit_changes_nothing(run: Cli, limit: str, words: list[str]) -> None:
    assert_exit(run("limits", "set", "acme", "usd 5/day"))
    before = run.snapshot()
    assert_bad_input(run("limits", "set", "acme", "requests 60/min", limit), *words)
    assert run.snapshot() == before


@pytest.mark.parametrize("command", ["set", "show", "clear"])
def test_bad_tenant_and_agent_names(run: Cli, command: str) -> None:
    extra = ["usd 5/day"] if command == "set" else []
    before = run.snapshot()
    assert_bad_input(run("limits", command, "ac{me}", *extra), "tenant name", "ac{me}")
    assert_bad_input(run("limits", command, "acme", "--agent", "a b", *extra), "agent name", "a b")
    assert run.snapshot() == before == {}


YAML = """\
tenants:
  acme:
    limits: ["usd 5/day", "requests 60/min"]
    every_agent: ["usd 1/hour"]
    agents:
      researcher: ["usd 0.50/hour"]
  globex:
    limits: "tokens 2M/hour"
"""

TOML = """\
[tenants.acme]
limits = ["usd 5/day", "requests 60/min"]
every_agent = ["usd 1/hour"]

[tenants.acme.agents]
researcher = ["usd 0.50/hour"]

[tenants.globex]
limits = ["tokens 2M/hour"]
"""


@pytest.mark.parametrize(("name", "text"), [("limits.yaml", YAML), ("limits.toml", TOML)])
def test_apply_file(run: Cli, tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    result = run("limits", "apply", str(path))
    assert_exit(result)
    assert "applied 4 scope(s)" in result.stdout
    assert limit_texts(show_json(run, "acme")) == {
        None: ["usd 5 86400.0", "requests 60 60.0"],
        "*": ["usd 1 3600.0"],
        "researcher": ["usd 0.5 3600.0"],
    }
    assert limit_texts(show_json(run, "globex")) == {None: ["tokens 2000000 3600.0"]}


BAD_FILES = [
    ("bad.yaml", 'tenants:\n  acme: {limits: ["usd 5/day"]\n', ["not valid YAML", "line"]),
    ("bad.toml", "[tenants.acme\nlimits = 1\n", ["not valid TOML"]),
    ("later.yaml", YAML + '  initech:\n    limits: ["usd -1/day"]\n', ["tenants.initech.limits", "-1"]),
    ("dim.yaml", 'tenants:\n  acme:\n    limits: ["gold9 5/day"]\n', ["unknown dimension", "gold9"]),
    ("name.yaml", 'tenants:\n  acme:\n    agents: {"a:b": ["usd 1/day"]}\n', ["agent name", "a:b"]),
    ("tenant.toml", '[tenants."a b"]\nlimits = ["usd 1/day"]\n', ["tenant name", "a b"]),
    ("typo.yaml", 'tenants:\n  acme:\n    limmits: ["usd 1/day"]\n', ["limmits"]),
    ("list.yaml", "- usd 5/day\n", ["tenants"]),
]


@pytest.mark.parametrize(("name", "text", "words"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_apply_validates_the_whole_file_first(run: Cli, tmp_path: Path, name: str, text: str, words: list[str]) -> None:
    assert_exit(run("limits", "set", "acme", "usd 9/day"))
    before = run.snapshot()
    path = tmp_path / name
    path.write_text(text)
    assert_bad_input(run("limits", "apply", str(path)), name, *words)
    assert run.snapshot() == before


def test_apply_missing_file(run: Cli, tmp_path: Path) -> None:
    assert_bad_input(run("limits", "apply", str(tmp_path / "nope.yaml")), "cannot read", "nope.yaml")


def test_apply_dry_run_prints_the_diff_and_writes_nothing(run: Cli, tmp_path: Path) -> None:
    assert_exit(run("limits", "set", "acme", "usd 9/day"))
    assert_exit(run("limits", "set", "acme", "--agent", "researcher", "usd 0.50/hour"))
    before = run.snapshot()
    path = tmp_path / "limits.yaml"
    path.write_text(YAML)
    result = run("limits", "apply", "--dry-run", str(path))
    assert_exit(result)
    assert result.stdout.splitlines() == [
        "acme: tenant: usd 9/day -> usd 5/day, requests 60/min",
        "acme: every agent: (none) -> usd 1/hour",
        "acme: agent researcher: usd 0.5/hour (unchanged)",
        "globex: tenant: (none) -> tokens 2000000/hour",
        f"dry run: 3 scope(s) set, 0 pruned, 1 unchanged from {path}; nothing written",
    ]
    assert run.snapshot() == before
    applied = run("limits", "apply", str(path))
    assert_exit(applied)
    assert applied.stdout.splitlines()[:4] == result.stdout.splitlines()[:4]
    assert "applied 4 scope(s)" in applied.stdout
    again = run("limits", "apply", "--dry-run", str(path))
    assert "dry run: 0 scope(s) set, 0 pruned, 4 unchanged" in again.stdout


def test_apply_prune_clears_what_the_file_omits_for_its_tenants_only(run: Cli, tmp_path: Path) -> None:
    assert_exit(run("limits", "set", "acme", "usd 5/day"))
    assert_exit(run("limits", "set", "acme", "--agent", "old", "usd 1/hour"))
    assert_exit(run("limits", "set", "acme", "--agent", "*", "requests 9/min"))
    assert_exit(run("limits", "set", "initech", "usd 2/day"))  # not in the file: never touched
    path = tmp_path / "limits.toml"
    path.write_text('[tenants.acme]\nlimits = ["usd 5/day"]\n[tenants.acme.agents]\nnew = ["usd 2/hour"]\n')
    before = run.snapshot()
    dry = run("limits", "apply", "--prune", "--dry-run", str(path))
    assert_exit(dry)
    assert dry.stdout.splitlines() == [
        "acme: tenant: usd 5/day (unchanged)",
        "acme: agent new: (none) -> usd 2/hour",
        "acme: every agent: requests 9/min -> (pruned)",
        "acme: agent old: usd 1/hour -> (pruned)",
        f"dry run: 1 scope(s) set, 2 pruned, 1 unchanged from {path}; nothing written",
    ]
    assert run.snapshot() == before
    assert_exit(run("limits", "apply", "--prune", str(path)))
    assert limit_texts(show_json(run, "acme")) == {None: ["usd 5 86400.0"], "new": ["usd 2 3600.0"]}
    assert limit_texts(show_json(run, "initech")) == {None: ["usd 2 86400.0"]}
    without_prune = run("limits", "apply", str(path))  # without --prune nothing is cleared
    assert "0 pruned" in without_prune.stdout


def test_apply_only_missing_reseeds_what_redis_lost_and_says_so(run: Cli, tmp_path: Path) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text(YAML)
    assert_exit(run("limits", "apply", str(path)))
    assert_exit(run("limits", "set", "acme", "usd 9/day"))  # a change made since the file: it stands
    worker = Budget.from_url(run.url, prefix=run.prefix).sync()
    worker.acquire("acme", usd=0.1).commit(usd=0.1)  # acme has spend history (a ledger); globex has none
    worker.close()
    client = run.client()
    client.hdel(f"{run.prefix}:{{acme}}:limits", scope_field("researcher"))  # Redis lost one scope of acme...
    client.delete(f"{run.prefix}:{{globex}}:limits")  # ...and all of globex, which never had a ledger
    client.close()
    before = run.snapshot()
    dry = run("limits", "apply", "--only-missing", "--dry-run", str(path))
    assert_exit(dry)
    assert run.snapshot() == before
    result = run("limits", "apply", "--only-missing", str(path))
    assert_exit(result)
    expected = [
        "acme: agent researcher: (missing) -> usd 0.5/hour (re-seeded)",
        "globex: tenant: (missing) -> tokens 2000000/hour (re-seeded)",
        "globex: no spend history in Redis (lost, or never spent): spend before now is not counted",
        f"re-seeded from {path}: 2 scope(s) of 2 tenant(s) missing in Redis, 1 with their spend history lost",
    ]
    assert result.stdout.splitlines() == expected
    assert dry.stdout.splitlines()[:-1] == [
        line.replace("(re-seeded)", "(would be re-seeded)") for line in expected[:-1]
    ]
    assert dry.stdout.splitlines()[-1].endswith("; nothing written")
    assert limit_texts(show_json(run, "acme"))[None] == ["usd 9 86400.0"]
    assert limit_texts(show_json(run, "acme"))["researcher"] == ["usd 0.5 3600.0"]
    again = run("limits", "apply", "--only-missing", str(path))
    assert again.stdout.splitlines() == [
        f"re-seeded from {path}: 0 scope(s) of 0 tenant(s) missing in Redis, 0 with their spend history lost"
    ]


def test_apply_only_missing_and_prune_are_refused_together(run: Cli, tmp_path: Path) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text(YAML)
    before = run.snapshot()
    assert_bad_input(run("limits", "apply", "--only-missing", "--prune", str(path)), "--only-missing", "--prune")
    assert run.snapshot() == before
