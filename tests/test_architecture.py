"""The package's layout: dependencies run one way, and the bottom layers import only torch.

Every ``import`` of every module of ``src/lavakv`` is read with ``ast`` (imports inside functions
included), so that a lazy import cannot hide a cycle or an upward dependency.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lavakv"

LAYERS: dict[str, int] = {
    "lavakv.methods": 0,
    "lavakv.ragged": 0,
    "lavakv.attention": 0,
    "lavakv.selection": 1,
    "lavakv.cachefile": 1,
    "lavakv.backends": 1,
    "lavakv.cache": 2,
    "lavakv.prompting": 3,
    "lavakv.decoding": 3,
    "lavakv.passkey": 3,
    "lavakv.models": 3,
    "lavakv.generate": 4,
    "lavakv.serving": 4.5,
    "lavakv.recording": 3.5,
    "lavakv.eval": 5,
    "lavakv.bench": 5,
    "lavakv.calibration": 5.5,
    "lavakv.cli": 6,
    "lavakv.__main__": 7,
}
"""Rank of each room: a module may import only modules of a lower rank, or of its own room without cycles."""
TORCH_ONLY = ("lavakv.methods", "lavakv.ragged")
TORCH_AND_RAGGED_ONLY = ("lavakv.backends",)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(lavakv modules, top-level third-party or stdlib packages) that ``path`` imports."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            targets = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "lavakv":
                ours.add(target)
            else:
                others.add(target.split(".")[0])
    return ours, others


def _resolve(target: str, modules: set[str]) -> str | None:
    """The module an import names (``lavakv.methods.Method`` -> ``lavakv.methods``)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _room(module: str) -> str:
    for room in sorted(LAYERS, key=len, reverse=True):
        if module == room or module.startswith(room + "."):
            return room
    raise AssertionError(f"{module} belongs to no room of LAYERS; add it there")


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {}
    for module, path in paths.items():
        ours, _ = _imports(path)
        graph[module] = {resolved for t in ours if (resolved := _resolve(t, modules)) not in (None, module)}
    return graph


def test_every_module_has_a_room():
    for module in _graph():
        if module != "lavakv":
            _room(module)


def test_no_import_cycles():
    graph = _graph()
    graph.pop("lavakv")
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target == "lavakv":
                raise AssertionError(f"{module} imports the package root; import the module it needs")
            if state.get(target) == 1:
                cycle = trail[trail.index(target) :] + [target] if target in trail else [module, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_dependencies_run_one_way():
    upward = []
    for module, targets in _graph().items():
        if module == "lavakv":
            continue
        room = _room(module)
        for target in targets:
            target_room = _room(target)
            if target_room != room and LAYERS[target_room] >= LAYERS[room]:
                upward.append(f"{module} (rank {LAYERS[room]}) imports {target} (rank {LAYERS[target_room]})")
    assert not upward, "upward or sideways imports:\n" + "\n".join(sorted(upward))


@pytest.mark.parametrize("room", TORCH_ONLY)
def test_methods_and_ragged_storage_import_only_torch(room):
    stdlib = set(sys.stdlib_module_names)
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        if module == "lavakv" or _room(module) != room:
            continue
        ours, others = _imports(path)
        assert others - stdlib <= {"torch", "__future__"}, (module, others - stdlib)
        assert all(_room(target) == room for target in ours), (module, ours)


@pytest.mark.parametrize("module", TORCH_AND_RAGGED_ONLY)
def test_attention_backends_import_only_torch_and_the_ragged_storage(module):
    path = PACKAGE / (module.rpartition(".")[2] + ".py")
    ours, others = _imports(path)
    assert others - set(sys.stdlib_module_names) <= {"torch", "__future__"}, others
    assert {_resolve(target, set(_graph())) for target in ours} <= {"lavakv.ragged"}, ours


def test_the_attention_glue_imports_no_other_lavakv_module():
    ours, _ = _imports(PACKAGE / "attention.py")
    assert ours == set()


def test_the_checker_sees_lazy_imports(tmp_path):
    source = tmp_path / "lavakv" / "demo.py"
    source.parent.mkdir()
    source.write_text("def f():\n    from .cli import main\n    from . import cache\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "lavakv"
    try:
        ours, _ = _imports(source)
    finally:
        PACKAGE = saved
    assert ours == {"lavakv.cli", "lavakv.cli.main", "lavakv", "lavakv.cache"}


MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 80


def _oversized(tree: ast.AST) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(tree):
        limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append((node.name, length))
    return found


def test_no_class_over_400_lines_and_no_function_over_80():
    offenders = [
        f"{path.relative_to(PACKAGE)}: {name} ({length} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, length in _oversized(ast.parse(path.read_text()))
    ]
    assert not offenders, "split these: " + "; ".join(offenders)


def test_the_size_check_sees_a_long_function():
    source = "def long():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    assert _oversized(ast.parse(source)) == [("long", MAX_FUNCTION_LINES + 1)]
