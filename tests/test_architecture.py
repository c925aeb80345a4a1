"""The package layout holds: no import cycle between sparamx's modules, the runtime core
imports none of the tooling packages, and no function is longer than a screenful.

The import graph is read from the source (``ast``), not by importing: every ``import``
and ``from ... import`` statement, at module level or inside a function, relative or
absolute, becomes an edge to the sparamx module it names (``from pkg import name``
names the submodule ``pkg.name`` when there is one, else ``pkg``)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "sparamx"
# The runtime: what loading and running a packed artifact needs.
CORE = (
    "sparamx",
    "sparamx.format",
    "sparamx.ops",
    "sparamx.layers",
    "sparamx.kv",
    "sparamx.kv_static",
    "sparamx.generate",
    "sparamx.sampling",
    "sparamx.conversation",
    "sparamx.artifact",
    "sparamx.integrity",
    "sparamx.export",
    "sparamx.cpu",
    "sparamx.select",
    "sparamx.models",
    "sparamx.assets",
)
TOOLING = ("sparamx.pipeline", "sparamx.sweep", "sparamx.serve", "sparamx.tools")
MAX_FUNCTION_LINES = 120


def module_files(root: Path = REPO, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` under ``root``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that one import statement in ``module`` names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [
            f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names
        ]
    else:
        return set()
    out = set()
    for name in names:
        # the deepest known module the name is (import a.b.c runs a.b.c; a name in a
        # module resolves to the module)
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def import_graph(root: Path = REPO, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in its body)."""
    files = module_files(root, package)
    known = set(files)
    graph = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(tree):
            deps |= _imported(node, mod, is_package, known)
        deps.discard(mod)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def long_functions(roots=("sparamx", "pruning", "eval"), limit: int = MAX_FUNCTION_LINES):
    out = []
    for root in roots:
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > limit:
                        out.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    return out


def test_the_graph_sees_the_packages_and_their_imports():
    graph = import_graph()
    assert {"sparamx.pipeline.runner", "sparamx.sweep.runner", "sparamx.serve.app"} <= set(graph)
    assert "sparamx.pipeline.config" in graph["sparamx.pipeline.runner"]  # module level
    assert "sparamx.pipeline.verify" in graph["sparamx.pipeline.runner"]  # in a method
    assert "sparamx.pipeline.bench" in graph["sparamx.sweep.runner"]  # from ..pipeline.bench
    assert "sparamx.ops" in graph["sparamx.pipeline.bench"]  # from .. import ops


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_reports_one(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    cycle = find_cycle(import_graph(tmp_path, "pkg"))
    assert cycle == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_runtime_core_imports_no_tooling():
    graph = import_graph()
    assert set(CORE) <= set(graph), set(CORE) - set(graph)
    bad = [
        f"{mod} imports {dep}"
        for mod in CORE
        for dep in sorted(graph[mod])
        if any(dep == t or dep.startswith(t + ".") for t in TOOLING)
    ]
    assert not bad, bad


def test_no_function_longer_than_a_screen():
    too_long = long_functions()
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(too_long)
