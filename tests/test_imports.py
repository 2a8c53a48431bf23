"""The package's modules import each other without cycles — counting the imports inside functions too (a deferred
import hides a cycle from the interpreter, not from the design): the layers are checkable, and any module can be
imported on its own."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "funcprobe"


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    """{"funcprobe.cli": path, "funcprobe.realised": path of realised.py or realised/__init__.py, ...}."""
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth (functions, methods, try blocks), except under TYPE_CHECKING."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(node, module: str, is_package: bool, known) -> set[str]:
    """The package modules one import statement of ``module`` names: ``import a.b`` → a.b; ``from .x import y`` →
    x.y when y is a submodule, else x (relative names resolved against ``module``'s package)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names} & known
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    found = set()
    for alias in node.names:
        name = f"{source}.{alias.name}"
        found |= {name} if name in known else ({source} & known)
    return found - {module}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the package modules it imports anywhere in its source}."""
    names = module_names(root)
    graph = {}
    for name, path in names.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges = set()
        for node in _imports(tree):
            edges |= _targets(node, name, path.name == "__init__.py", names.keys())
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (a depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_deferred_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import f\n")
    (package / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (package / "b.py").write_text("from . import c\nimport pkg.sub.d\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    (package / "sub" / "__init__.py").write_text("from .d import h\n")
    (package / "sub" / "d.py").write_text("from ..a import f\n")
    graph = import_graph(package)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c", "pkg.sub.d"}, "pkg.c": set(),
                     "pkg.sub": {"pkg.sub.d"}, "pkg.sub.d": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.d", "pkg.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_funcprobe_has_no_import_cycle():
    graph = import_graph()
    assert "funcprobe.cli" in graph and "funcprobe.delta_h1" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, stack = set(), [start]
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def test_the_batch_and_reward_modules_keep_their_layers():
    """batch.py (fields, validation) imports no funcprobe module; the batch files sit above it. rewards.py (built-in
    rewards, the check of any reward's values) imports none but the prompt reader, a leaf too: trl_rewards, rollouts
    and the sampler build on it, never the reverse. trl_rewards does not reach rollouts, which builds on it."""
    graph = import_graph()
    assert graph["funcprobe.batch"] == set()
    assert graph["funcprobe.rollouts_file"] == {"funcprobe.batch"}
    assert graph["funcprobe.prompts"] == set()
    assert graph["funcprobe.rewards"] <= {"funcprobe.prompts"}, sorted(graph["funcprobe.rewards"])
    assert "funcprobe.rollouts" not in reachable(graph, "funcprobe.trl_rewards")
    assert reachable(graph, "funcprobe.rollouts") >= {"funcprobe.rewards", "funcprobe.trl_rewards"}
