"""The wheel ships the Lua scripts, and an installed copy loads them from inside the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_contains_lua_and_installed_copy_loads_it(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("slowburn_redis-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for script in ("lib", "acquire", "settle", "status", "clock/server", "clock/test"):
        assert f"slowburn_redis/lua/{script}.lua" in names

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = "import slowburn_redis.scripts as s; print(s.lua_dir()); print(len(s.Script('acquire').source))"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    ).stdout.split()
    assert out[0].startswith(str(target))
    assert int(out[1]) > 1000
