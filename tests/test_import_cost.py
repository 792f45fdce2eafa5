"""litellm takes seconds to import: only the LLM layer may import it, never the package or the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import atexit, sys; atexit.register(lambda: print('LITELLM-LOADED', 'litellm' in sys.modules)); "


def _run(code: str) -> tuple[int, str]:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true"}
    done = subprocess.run([sys.executable, "-c", PROBE + code], capture_output=True, text=True, timeout=120, env=env)
    return done.returncode, done.stdout + done.stderr


def _loaded(output: str) -> bool:
    (line,) = [line for line in output.splitlines() if line.startswith("LITELLM-LOADED")]
    return line.split()[1] == "True"


@pytest.mark.parametrize(
    "code",
    [
        "import slowburn_redis",
        "import slowburn_redis.report, slowburn_redis.integrations, slowburn_redis.sync, slowburn_redis.testing",
        "from slowburn_redis import Budget; Budget.embedded().sync().close()",
    ],
)
def test_package_does_not_import_litellm(code: str) -> None:
    rc, output = _run(code)
    assert rc == 0, output
    assert not _loaded(output), output


@pytest.mark.parametrize("args", [["--help"], ["report", "--help"], ["status", "--help"]])
def test_cli_help_does_not_import_litellm(args: list[str]) -> None:
    rc, output = _run(f"from slowburn_redis.cli import main; sys.argv = ['slowburn-redis', *{args!r}]; main()")
    assert rc == 0, output
    assert "Usage" in output
    assert not _loaded(output), output


def test_llm_layer_does_import_litellm() -> None:
    # the probe can tell: the LLM layer is where litellm comes in
    rc, output = _run("import slowburn_redis.llm")
    assert rc == 0, output
    assert _loaded(output)


def test_package_import_loads_no_cli_or_embedded_store_dependency() -> None:
    # rich is left out here: structlog itself imports it whenever it is installed (for its
    # console tracebacks). tests/test_wheel.py checks a lean install, where rich is absent.
    code = (
        "import slowburn_redis; "
        "print('HEAVY', sorted(m for m in ('fakeredis', 'lupa', 'click', 'yaml') if m in sys.modules))"
    )
    rc, output = _run(code)
    assert rc == 0, output
    assert "HEAVY []" in output, output
