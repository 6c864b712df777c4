"""The package's import graph is the pipeline: no cycle, no module importing a later one.

``alignkit.LAYERS`` (written once, in the package docstring) is the rule; these tests walk the
source with ``ast`` and fail on an import that breaks it, on a cycle, and on an ``alignkit``
import inside a function anywhere but the CLI (which defers them to keep ``--help`` fast).
"""

import ast
import shutil
from pathlib import Path

import alignkit

PKG = Path(alignkit.__file__).resolve().parent


def imports(path: Path, package: str = "alignkit") -> list[tuple[str, bool]]:
    """``[(module, inside_a_function)]`` of the package modules one file imports."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def in_function(node) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                return True
        return False

    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else (node.module or "")
            if node.level and node.module:
                base = f"{package}.{node.module}"
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            parts = name.split(".")
            if parts[0] == package and len(parts) > 1:
                found.append((parts[1], in_function(node)))
    return found


def check_layers(pkg: Path, order: tuple[str, ...], lazy_ok: tuple[str, ...] = ("cli",)) -> list[str]:
    """Every violation of ``order`` in package directory ``pkg``, as readable lines."""
    package = pkg.name
    modules = {p.stem for p in pkg.glob("*.py")} - {"__init__"}
    problems = [f"{m} is not listed in LAYERS" for m in sorted(modules - set(order))]
    rank = {m: i for i, m in enumerate(order)}
    graph: dict[str, set[str]] = {}
    for m in sorted(modules):
        for target, lazy in imports(pkg / f"{m}.py", package):
            if target not in modules or target == m:
                continue
            graph.setdefault(m, set()).add(target)
            if rank.get(target, -1) >= rank.get(m, -1):
                problems.append(f"{m} imports {target}, which comes after it")
            if lazy and m not in lazy_ok:
                problems.append(f"{m} imports {target} inside a function")
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                problems.append("cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return problems


def test_the_package_follows_its_layers():
    assert check_layers(PKG, alignkit.LAYERS) == []


def test_layers_are_documented_once_in_the_package_docstring():
    rows = [line[4:].split("  ")[0] for line in alignkit.__doc__.splitlines()
            if line.startswith("    ") and line[4] != " "]  # continuation lines are indented more
    documented = [name.strip(",") for row in rows for name in row.split()]
    assert [m for m in alignkit.LAYERS if m != "__main__"] == documented


def test_a_planted_cycle_and_an_upward_import_are_caught(tmp_path):
    """Introduce a cycle on purpose in a copy of the package: the check must fail."""
    copy = tmp_path / "alignkit"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert check_layers(copy, alignkit.LAYERS) == []
    data = copy / "data.py"
    data.write_text(data.read_text() + "\nfrom alignkit import stages  # planted\n")
    problems = check_layers(copy, alignkit.LAYERS)
    assert "data imports stages, which comes after it" in problems
    assert any(p.startswith("cycle: ") and "data" in p and "stages" in p for p in problems)


def test_a_two_module_cycle_is_reported_as_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n")
    problems = check_layers(pkg, ("a", "b"))
    assert problems == ["a imports b, which comes after it", "b imports a inside a function",
                        "cycle: a -> b -> a"]
    assert check_layers(pkg, ("b", "a"), lazy_ok=("b",)) == [
        "b imports a, which comes after it", "cycle: a -> b -> a"]
