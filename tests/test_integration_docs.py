"""The Python examples of docs/INTEGRATIONS.md and of the README's Integrations section run as written, offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return python_blocks(text.split("## Integrations\n", 1)[1].split("\n## ", 1)[0])


DOC_BLOCKS = python_blocks((ROOT / "docs" / "INTEGRATIONS.md").read_text())


def run(code: str) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_OFFLINE_MODE": "true",
        "CREWAI_DISABLE_TELEMETRY": "true",
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_readme_example_waits_and_matches_the_bill() -> None:
    (code,) = readme_blocks()
    line = run(code).strip().splitlines()[-1]
    match = re.fullmatch(r"(\d+) calls, ledger (\d+) nano-USD, stub billed (\d+)", line)
    assert match, line
    calls, ledger, billed = (int(g) for g in match.groups())
    assert calls == 8 and ledger == billed > 0


def test_every_framework_has_an_example() -> None:
    text = "\n".join(DOC_BLOCKS)
    for module in ("langchain", "langgraph", "crewai", "autogen", "openai_agents"):
        assert f"slowburn_redis.integrations.{module} import" in text, module
    assert "slowburn_redis.metrics import" in text and "router=router" in text


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(DOC_BLOCKS)))
def test_the_docs_examples_run(index: int) -> None:
    code = DOC_BLOCKS[index]
    out = run(code).strip()
    assert out, "an example prints what it did"
    last = out.splitlines()[-1]
    if "calls committed" in last:  # LangChain: the ledger equals the stub's bill
        committed, billed = re.findall(r"(\d+) nano-dollars; the stub billed (\d+)", last)[0]
        assert committed == billed
    elif last.startswith("[("):  # per-agent call counts
        assert "(" in last and ", 0)" not in last
