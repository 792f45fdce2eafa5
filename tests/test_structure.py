"""The package's structure, checked from its source: layers without cycles, one path to Redis, a faithful twin.

- No import cycle between modules of ``slowburn_redis`` (imports inside
  ``if TYPE_CHECKING:`` blocks aside; imports inside functions count).
- No module reaches into another object's private members (``x._name``
  where x is not ``self``, ``cls`` or ``super()``; ``sys._getframe`` aside).
- Only `slowburn_redis.engine` and the connection factories touch a Redis client.
- No function of the core is longer than 60 lines.
- The sync twin's public methods have the async Budget's signatures.
- Every operation of a closed Budget raises BudgetClosed.
"""

from __future__ import annotations

import ast
import gc
import inspect
from pathlib import Path

import pytest

from slowburn_redis import Budget, BudgetClosed, SyncBudget

PACKAGE = Path(__file__).resolve().parent.parent / "slowburn_redis"
MODULES = {
    ".".join(("slowburn_redis", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): path
    for path in sorted(PACKAGE.rglob("*.py"))
}
# The core: everything but the operator's CLI and the framework adapters, which have their own tests.
CORE = {name: path for name, path in MODULES.items() if not name.startswith(("slowburn_redis.cli",))}


def _parse(path: Path) -> ast.Module:
    """`path` parsed with the garbage collector paused.

    A finalizer that runs during a parse (an asyncio task another test left
    behind logs its traceback, and Python 3.11's traceback formatting calls
    ``ast.parse``) breaks CPython 3.11's shared AST state ("AST constructor
    recursion depth mismatch"); no collection, no finalizer.
    """
    source = path.read_text()
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source)
    finally:
        if enabled:
            gc.enable()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[str]:
    """Modules imported anywhere in `tree`, TYPE_CHECKING blocks left out; ``from p import m`` names ``p.m``."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.append(full if full in MODULES else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = _parse(path)
        # A package's __init__ re-exports its modules: importing the package itself is not a layer arrow.
        graph[name] = {dep for dep in _imports(tree) if dep in MODULES and dep != name and dep != "slowburn_redis"}
    return graph


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                walk(dep, [*path, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert cycles == []


def _private_reaches(path: Path) -> list[str]:
    found = []
    for node in ast.walk(_parse(path)):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "sys"))
            and not (isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "super")
        ):
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
    return found


def test_no_module_reaches_into_another_objects_private_members() -> None:
    assert [hit for path in MODULES.values() for hit in _private_reaches(path)] == []


def test_only_the_engine_touches_the_redis_client() -> None:
    allowed = {"slowburn_redis.engine", "slowburn_redis.connection", "slowburn_redis.scripts"}
    touching = []
    for name, path in MODULES.items():
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.Attribute) and node.attr == "client" and name not in allowed:
                touching.append(f"{name}:{node.lineno}")
    assert touching == []


def test_no_core_function_is_longer_than_60_lines() -> None:
    long = []
    for name, path in CORE.items():
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 60:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert long == []


TWIN_METHODS = [
    "set_limits",
    "clear_limits",
    "set_unlimited",
    "get_limits",
    "acquire",
    "quote",
    "run",
    "status",
    "reset",
    "report",
    "events",
    "key",
]


@pytest.mark.parametrize("name", TWIN_METHODS)
def test_sync_twin_has_the_async_signature(name: str) -> None:
    async_params = list(inspect.signature(getattr(Budget, name)).parameters.values())
    sync_params = list(inspect.signature(getattr(SyncBudget, name)).parameters.values())
    assert [(p.name, p.kind, p.default, p.annotation) for p in sync_params] == [
        (p.name, p.kind, p.default, p.annotation) for p in async_params
    ]


def test_twin_covers_every_public_budget_method() -> None:
    public = {n for n, v in vars(Budget).items() if not n.startswith("_") and callable(v)}
    construction = {"from_url", "embedded", "sync", "aclose", "keys"}
    assert public - construction == set(TWIN_METHODS)


async def test_every_operation_of_a_closed_budget_raises_budget_closed() -> None:
    budget = Budget.embedded()
    await budget.set_limits("acme", ["usd 1/hour"])
    reservation = await budget.acquire("acme", usd=0.1)
    await budget.aclose()
    calls = {
        "set_limits": lambda: budget.set_limits("acme", ["usd 2/hour"]),
        "clear_limits": lambda: budget.clear_limits("acme"),
        "get_limits": lambda: budget.get_limits("acme"),
        "acquire": lambda: budget.acquire("acme", usd=0.1),
        "quote": lambda: budget.quote("acme", usd=0.1),
        "run": lambda: budget.run("acme", caps=["tokens 10"]).__aenter__(),
        "status": lambda: budget.status("acme"),
        "reset": lambda: budget.reset("acme"),
        "report": lambda: budget.report("acme"),
        "events": lambda: anext(budget.events("acme")),
        "commit": lambda: reservation.commit(),
        "release": lambda: reservation.release(),
        "extend": lambda: reservation.extend(),
    }
    refused = []
    for name, call in calls.items():
        with pytest.raises(BudgetClosed):
            await call()
        refused.append(name)
    assert refused == list(calls)


def test_every_operation_of_a_closed_sync_twin_raises_budget_closed() -> None:
    twin = Budget.embedded().sync()
    twin.set_limits("acme", ["usd 1/hour"])
    twin.close()
    for call in (
        lambda: twin.status("acme"),
        lambda: twin.get_limits("acme"),
        lambda: twin.acquire("acme"),
        lambda: twin.run("acme", caps=["tokens 10"]).__enter__(),
    ):
        with pytest.raises(BudgetClosed):
            call()


def test_the_twin_is_built_from_every_constructor_option() -> None:
    from dataclasses import fields

    from slowburn_redis.budget import _Given

    options = [name for name in inspect.signature(Budget.__init__).parameters if name not in ("self", "client")]
    assert [f.name for f in fields(_Given)] == options
