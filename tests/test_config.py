"""The limits file model: YAML and TOML, validated as a whole before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from slowburn_redis.config import InvalidConfig, LimitsFile, load_limits_file, parse_limits_text
from slowburn_redis.limits import Limit


def test_yaml_and_toml_describe_the_same_file() -> None:
    yaml_text = """
tenants:
  acme:
    limits: ["usd 5/day", "concurrency 8"]
    every_agent: "usd 1/hour"
    agents:
      researcher: ["usd 0.50/hour"]
"""
    toml_text = """
[tenants.acme]
limits = ["usd 5/day", "concurrency 8"]
every_agent = "usd 1/hour"
agents = { researcher = ["usd 0.50/hour"] }
"""
    from_yaml = parse_limits_text(yaml_text, toml=False)
    assert from_yaml == parse_limits_text(toml_text, toml=True)
    assert from_yaml.assignments() == [
        ("acme", None, [Limit.parse("usd 5/day"), Limit.parse("concurrency 8")]),
        ("acme", "*", [Limit.parse("usd 1/hour")]),
        ("acme", "researcher", [Limit(dimension="usd", amount="0.50", window="1h")]),
    ]


def test_only_named_scopes_are_written_and_star_is_every_agent() -> None:
    config = parse_limits_text('tenants:\n  a:\n    agents: {"*": ["requests 5/min"], b: []}\n', toml=False)
    assert config.assignments() == [("a", "*", [Limit.parse("requests 5/min")]), ("a", "b", [])]
    assert parse_limits_text("tenants:\n  a: {}\n", toml=False).assignments() == []


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('tenants:\n  a:\n    limits: ["usd -5/day"]\n', ["tenants.a.limits", "-5"]),
        ('tenants:\n  a:\n    limits: ["gold9 5/day"]\n', ["unknown dimension"]),
        ('tenants:\n  a:\n    limits: ["usd 5/day", "usd 7/day"]\n', ["same window"]),
        ("tenants:\n  a:\n    limits: 5\n", ["limits must be a list"]),
        ('tenants:\n  a:\n    every_agent: ["usd 1/day"]\n    agents: {"*": []}\n', ["given twice"]),
        ('tenants:\n  "a{b}": {}\n', ["tenant name"]),
        ('tenants:\n  a:\n    agents: {"x y": []}\n', ["agent name"]),
        ("tenants:\n  a:\n    agents: [1]\n", ["agents must be a mapping"]),
        ("tenants:\n  a:\n", ["has no limits"]),
        ("tenant:\n  a: {}\n", ["tenant"]),
        ("just text", ["expected a mapping"]),
        ("tenants: [", ["not valid YAML", "line 1"]),
    ],
)
def test_invalid_files_name_the_problem(text: str, words: list[str]) -> None:
    with pytest.raises(InvalidConfig) as info:
        parse_limits_text(text, toml=False, source="f.yaml")
    message = str(info.value)
    assert message.startswith("f.yaml: ") and "\n" not in message
    for word in words:
        assert word in message


def test_load_by_suffix(tmp_path: Path) -> None:
    (tmp_path / "l.toml").write_text('[tenants.a]\nlimits = ["requests 1/s"]\n')
    (tmp_path / "l.yml").write_text("tenants: {a: {limits: [requests 1/s]}}\n")
    assert load_limits_file(tmp_path / "l.toml") == load_limits_file(tmp_path / "l.yml")
    assert isinstance(load_limits_file(tmp_path / "l.toml"), LimitsFile)
    with pytest.raises(InvalidConfig, match="not valid TOML"):
        (tmp_path / "bad.toml").write_text("tenants = [")
        load_limits_file(tmp_path / "bad.toml")
    with pytest.raises(InvalidConfig, match="cannot read"):
        load_limits_file(tmp_path / "missing.yaml")
