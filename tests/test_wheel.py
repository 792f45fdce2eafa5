"""The built wheel: Lua scripts, py.typed and metadata inside; a lean install is a worker's, not the CLI's.

The lean-install test builds a fresh virtualenv with exactly the core
dependencies uv.lock pins (no extras), installs the wheel into it, and checks
what a production worker gets: `import slowburn_redis` works and loads none of
litellm, rich or fakeredis; the embedded store and the CLI each name their
extra in a typed error or one line, instead of a traceback.
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (built,) = dist.glob("slowburn_redis-*.whl")
    return built


@pytest.mark.slow
def test_wheel_contains_lua_and_installed_copy_loads_it(wheel: Path, tmp_path: Path) -> None:
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


@pytest.mark.slow
def test_wheel_is_typed_and_versioned_from_one_source(wheel: Path) -> None:
    from slowburn_redis import __version__

    archive = zipfile.ZipFile(wheel)
    assert "slowburn_redis/py.typed" in archive.namelist()
    (metadata_name,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
    metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode())
    assert metadata["Version"] == __version__
    assert wheel.name.startswith(f"slowburn_redis-{__version__}-")
    classifiers = metadata.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    core = [req for req in metadata.get_all("Requires-Dist") or [] if "extra ==" not in req]
    assert sorted(req.split(">")[0].split("[")[0] for req in core) == ["pydantic", "redis", "structlog"]


LEAN_PROBE = """
import sys
import slowburn_redis
from slowburn_redis import Budget, MissingExtra
loaded = sorted(name for name in ("litellm", "rich", "fakeredis", "click", "yaml") if name in sys.modules)
print("LOADED", loaded)
for name in ("litellm", "rich", "fakeredis", "click"):
    try:
        __import__(name)
    except ImportError:
        print("ABSENT", name)
try:
    Budget.embedded()
except MissingExtra as exc:
    print("EMBEDDED", exc.extra, exc)
"""


@pytest.mark.slow
def test_lean_install_is_a_worker_without_cli_or_embedded_store(wheel: Path, tmp_path: Path) -> None:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH (the README's test command and .ci/run provide it)")
    env = {**os.environ, "VIRTUAL_ENV": str(tmp_path / "venv")}
    env.pop("UV_PROJECT_ENVIRONMENT", None)
    run = lambda *args: subprocess.run(args, check=True, capture_output=True, text=True, env=env, cwd=ROOT)  # noqa: E731
    core = tmp_path / "core.txt"
    run(uv, "export", "--frozen", "--no-dev", "--no-emit-project", "--no-hashes", "-o", str(core))
    run(uv, "venv", "--python", sys.executable, str(tmp_path / "venv"))
    run(uv, "pip", "install", "--python", str(tmp_path / "venv/bin/python"), "-r", str(core))
    run(uv, "pip", "install", "--python", str(tmp_path / "venv/bin/python"), "--no-deps", str(wheel))

    out = run(str(tmp_path / "venv/bin/python"), "-c", LEAN_PROBE).stdout
    assert "LOADED []" in out, out
    for name in ("litellm", "rich", "fakeredis", "click"):
        assert f"ABSENT {name}" in out, out
    assert "EMBEDDED embedded the embedded store (Budget.embedded) needs the [embedded] extra" in out, out

    cli = subprocess.run([str(tmp_path / "venv/bin/slowburn-redis"), "status"], capture_output=True, text=True)
    assert cli.returncode == 2
    assert cli.stdout == ""
    assert cli.stderr.strip().splitlines() == [
        "slowburn-redis: the command line needs the [cli] extra (click is not installed): "
        'pip install "slowburn-redis[cli]"'
    ]
