"""The layout's rules, read from the source: which folder may import which, and no import circle.

Every import counts, a lazy one inside a function too: it is a dependency all the same."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from runs import REPO

ROOT = REPO
PACKAGES = ("launcher", "model", "routing", "data")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("smoe", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def imports_of(path: Path) -> set[str]:
    """The smoe modules ``path`` imports (``from x import name`` counts x, and x.name when that is a module)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] == "smoe"}


def graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")] + [ROOT / "__init__.py"]
    modules = {module_name(p): p for p in files}
    return {name: {i for i in imports_of(path) if i in modules and i != name} for name, path in modules.items()}


GRAPH = graph()


@pytest.mark.parametrize("folder", ["model", "routing", "data"])
def test_the_core_never_imports_the_launcher(folder):
    offenders = {m: sorted(i for i in deps if i.startswith("smoe.launcher"))
                 for m, deps in GRAPH.items() if m.startswith(f"smoe.{folder}")}
    assert not {m: i for m, i in offenders.items() if i}


def test_models_take_nothing_from_the_data():
    offenders = {m: sorted(i for i in deps if i.startswith("smoe.data"))
                 for m, deps in GRAPH.items() if m.startswith("smoe.model")}
    assert not {m: i for m, i in offenders.items() if i}


def test_no_import_circle():
    """Depth-first search for a back edge; a package's ``__init__`` re-exporting its modules is not one."""
    def edges(module):
        return {d for d in GRAPH[module] if not module.startswith(d + ".") and not d.startswith(module + ".")}

    state, stack, circles = {}, [], []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for dependency in sorted(edges(module)):
            if state.get(dependency) == "open":
                circles.append(stack[stack.index(dependency):] + [dependency])
            elif dependency not in state:
                visit(dependency)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not circles, " ; ".join(" -> ".join(c) for c in circles)


# launcher/'s sub-packages in layers: a module imports only from its own layer or those above it
# in this list (the most specific prefix decides).
LAUNCHER_LAYERS = [
    ["smoe.launcher.config"],
    ["smoe.launcher.runtime"],
    ["smoe.launcher.evaluation"],  # metrics and the sweep; `smoe eval` itself is a command, below
    ["smoe.launcher.families"],
    ["smoe.launcher.checkpoints"],
    ["smoe.launcher.training"],
    ["smoe.launcher.evaluation.run", "smoe.launcher.evaluation.slice", "smoe.launcher.bench",
     "smoe.launcher.downstream", "smoe.launcher.export"],
    ["smoe.launcher.cli"],
]


def launcher_layer(module: str) -> int | None:
    matches = [(len(prefix), depth) for depth, prefixes in enumerate(LAUNCHER_LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1] if matches else None


def test_every_launcher_module_has_a_layer():
    assert not [m for m in GRAPH if m.startswith("smoe.launcher.") and launcher_layer(m) is None]


def test_the_launcher_layers_depend_one_way():
    upward = {m: sorted(d for d in deps if (launcher_layer(d) or 0) > launcher_layer(m))
              for m, deps in GRAPH.items() if m.startswith("smoe.launcher.")}
    assert not {m: d for m, d in upward.items() if d}


def test_the_checker_sees_imports_of_every_form():
    launcher = ROOT / "launcher"
    assert "smoe.launcher.checkpoints" in imports_of(launcher / "training" / "trainer.py")  # from smoe.launcher import x
    assert "smoe.launcher.training.trainer" in imports_of(launcher / "cli.py")  # inside a function
    assert "smoe.model.bert" in imports_of(launcher / "downstream" / "tasks" / "base.py")  # import x.y, in a function
    assert launcher_layer("smoe.launcher.evaluation.run") > launcher_layer("smoe.launcher.training")
    assert launcher_layer("smoe.launcher.evaluation.sweep") < launcher_layer("smoe.launcher.families")


def test_the_tests_mirror_the_packages():
    """tests/routing/ holds routing/'s tests, tests/launcher/runtime/ launcher/runtime/'s, and so on
    (tests/gpu/ is the GPU tier, across packages)."""
    tests = ROOT / "tests"
    folders = {p.relative_to(tests) for p in tests.rglob("test_*.py")} - {Path("test_layout.py")}
    unmatched = sorted(str(f) for f in folders if f.parts[0] != "gpu" and not (ROOT / f.parent).is_dir())
    assert not unmatched and {f.parts[0] for f in folders} - {"gpu"} == {"routing", "model", "data", "launcher"}
