"""The package's import graph is the pipeline: no cycle, no module importing a later one.

``alignkit.LAYERS`` (written once, in the package docstring) is the rule, a subpackage counting
as one entry with a ``LAYERS`` of its own (``alignkit.analyses``); these tests walk the source,
subpackages included, with ``ast`` and fail on an import that breaks either order, on a cycle,
and on an ``alignkit`` import inside a function anywhere but the CLI (which defers them to keep
``--help`` fast). Packaging must ship the subpackages too.
"""

import ast
import importlib
import re
import shutil
from pathlib import Path

import tomllib

import alignkit

PKG = Path(alignkit.__file__).resolve().parent


def imports(path: Path, package: str = "alignkit") -> list[tuple[str, bool]]:
    """``[(module, inside_a_function)]`` of the package modules one file imports: a module of a
    subpackage as ``"sub.module"`` (``"sub"`` for the subpackage itself)."""
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
                sub = PKG_DIRS.get(package, Path()) / parts[1]
                deep = sub.is_dir() and len(parts) > 2 and (sub / f"{parts[2]}.py").is_file()
                found.append((".".join(parts[1:3]) if deep else parts[1], in_function(node)))
    return found


PKG_DIRS: dict[str, Path] = {}  # package name -> its directory, for telling subpackages apart


def _order(pkg: Path, order: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Each module's rank, a subpackage's modules ranked within its entry by its own LAYERS."""
    rank = {m: (i,) for i, m in enumerate(order)}
    for sub in (d for d in sorted(pkg.iterdir()) if (d / "__init__.py").is_file()):
        inner = ast.literal_eval(next(
            n.value for n in ast.parse((sub / "__init__.py").read_text()).body
            if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "LAYERS"))
        rank |= {f"{sub.name}.{m}": (*rank.get(sub.name, (-1,)), j) for j, m in enumerate(inner)}
    return rank


def check_layers(pkg: Path, order: tuple[str, ...], lazy_ok: tuple[str, ...] = ("cli",)) -> list[str]:
    """Every violation of ``order`` in package directory ``pkg`` (subpackages included, each
    ranked by its own ``LAYERS`` within its entry), as readable lines."""
    package = pkg.name
    PKG_DIRS[package] = pkg
    files = {(str(p.relative_to(pkg).with_suffix("")).replace("/", ".")): p
             for p in pkg.rglob("*.py") if "__pycache__" not in p.parts}
    files = {k.removesuffix(".__init__"): v for k, v in files.items() if k != "__init__"}
    modules = set(files)
    rank = _order(pkg, order)
    problems = [f"{m} is not listed in LAYERS" for m in sorted(modules - set(rank))]
    graph: dict[str, set[str]] = {}
    for m in sorted(modules):
        for target, lazy in imports(files[m], package):
            if target not in modules or target == m or m.startswith(f"{target}."):
                continue  # a subpackage's modules import their own package's members
            graph.setdefault(m, set()).add(target)
            inside = m.split(".")[0] == target.split(".")[0] and "." in m
            mine, theirs = rank.get(m, (-1,)), rank.get(target, (-1,))
            if (theirs >= mine) if inside or "." not in target else theirs[:1] >= mine[:1]:
                if m != target.split(".")[0]:  # a subpackage's __init__ lists its own modules
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


def documented(block: str) -> list[str]:
    """The modules of a docs/layout.md tree, in order: its rows ``  name.py`` or ``  name/``."""
    return re.findall(r"^  (\w+)(?:\.py|/) ", block, re.M)


def test_layers_are_documented_once_in_the_layout_page():
    page = (PKG.parent / "docs" / "layout.md").read_text()
    package = page.split("```\nalignkit/ ")[1].split("```")[0]
    subpackage = page.split("```\nalignkit/analyses/")[1].split("```")[0]
    assert [m for m in alignkit.LAYERS if m != "__main__"] == documented(package)
    analyses = importlib.import_module("alignkit.analyses")
    assert list(analyses.LAYERS) == documented(subpackage)
    assert sorted(analyses.LAYERS) == sorted(p.stem for p in (PKG / "analyses").glob("*.py")
                                             if p.stem != "__init__")


def test_packaging_ships_the_subpackages():
    """A plain ``pip install .`` (Colab) must install ``alignkit.analyses`` too."""
    packages = tomllib.loads((PKG.parent / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]
    subpackages = {f"alignkit.{d.name}" for d in PKG.iterdir() if (d / "__init__.py").is_file()}
    assert subpackages and {"alignkit", *subpackages} <= set(packages)


def test_a_planted_cycle_and_an_upward_import_are_caught(tmp_path):
    """Introduce a cycle on purpose in a copy of the package: the check must fail."""
    copy = tmp_path / "alignkit"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert check_layers(copy, alignkit.LAYERS) == []
    data = copy / "data.py"
    data.write_text(data.read_text() + "\nfrom alignkit import plots  # planted\n")
    problems = check_layers(copy, alignkit.LAYERS)
    assert "data imports plots, which comes after it" in problems
    assert any(p.startswith("cycle: ") and "data" in p and "plots" in p for p in problems)
    common = copy / "analyses" / "common.py"  # inside the subpackage: an upward import
    common.write_text(common.read_text() + "\nfrom alignkit.analyses import compare  # planted\n")
    assert "analyses.common imports analyses.compare, which comes after it" in check_layers(
        copy, alignkit.LAYERS)
    runs = copy / "runs.py"  # a module below the subpackage importing one of its modules
    runs.write_text(runs.read_text() + "\nfrom alignkit.analyses import cka  # planted\n")
    assert "runs imports analyses.cka, which comes after it" in check_layers(copy, alignkit.LAYERS)


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
