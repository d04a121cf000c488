"""The import graph of the package: no cycles, and the config below what it configures.

Imports are read from the source (ast), not by importing: every `import` counts, at module level or
inside a function (a lazy import still ties the two modules together, and a cycle through one is a
cycle a refactor can trip over). Imports under `if TYPE_CHECKING:` are left out: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "spaceft"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported(source: str, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package's modules that the module `name` with this source imports (the longest known
    prefix of each imported name: `from spaceft.bench import run` imports spaceft.bench.run)."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def add(dotted: str) -> None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        if dotted and dotted != name:
            found.add(dotted)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    add(f"{base}.{alias.name}")
            visit(child)

    visit(ast.parse(source))
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    modules = set(paths)
    graph = {
        name: imported(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", modules)
        for name, path in paths.items()
    }
    for name, edges in graph.items():  # importing a submodule runs its package's __init__: no edge needed
        edges.discard(name.rpartition(".")[0])
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_cycle_finder_finds_lazy_and_relative_cycles(tmp_path: Path) -> None:
    """A package of three modules: a imports b at the top, b imports c inside a function, c imports a
    relatively: a -> b -> c -> a. Under TYPE_CHECKING, d's import of a is no edge."""
    pkg = tmp_path / "spaceft"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from spaceft import b\n")
    (pkg / "b.py").write_text("def f():\n    import spaceft.c\n")
    (pkg / "c.py").write_text("from .a import thing\n")
    (pkg / "d.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    from spaceft.a import x\n")
    graph = import_graph(pkg)
    assert graph["spaceft.d"] == set()
    assert find_cycle(graph) == ["spaceft.a", "spaceft.b", "spaceft.c", "spaceft.a"]
    (pkg / "c.py").write_text("")
    assert find_cycle(import_graph(pkg)) is None


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_config_imports_only_the_modules_that_own_its_choices() -> None:
    """config sits below every stage, the driver, the CLI and the harness adapter's run code: what it
    imports (transitively) are the leaf modules whose choice lists and types it names."""
    below = reachable(import_graph(), "spaceft.config") | reachable(import_graph(), "spaceft.configfile")
    allowed = {"spaceft.config", "spaceft.chat", "spaceft.data", "spaceft.losses", "spaceft.lmeval",
               "spaceft.bench.catalog", "spaceft.recipes", "spaceft.rundir", "spaceft.tasks",
               "spaceft.default_model", "spaceft.fingerprint", "spaceft.token_logps"}  # fmt: skip
    assert below <= allowed, f"config imports {sorted(below - allowed)}"
