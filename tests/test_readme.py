"""The README's Python example runs as written and prints what the README shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def section_blocks(title: str) -> list[str]:
    """The fenced code blocks of one README section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(?:python|text)\n(.*?)```", section, flags=re.S)


def test_python_example_prints_what_the_readme_shows() -> None:
    code, shown = section_blocks("In Python")[:2]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, check=True, cwd=ROOT
    )
    printed = [line for line in result.stdout.splitlines() if not re.match(r"\d{4}-\d\d-\d\d ", line)]

    def normal(line: str) -> str:
        return re.sub(r"retry in [0-9.]+s", "retry in Ns", line)

    assert [normal(line) for line in printed] == [normal(line) for line in shown.splitlines()]
