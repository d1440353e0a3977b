"""Documentation that stays true: every public module shows a runnable example (pytest runs
them through --doctest-modules, see pyproject.toml) and the package's imports go one way."""

import ast
import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Modules whose docstrings must carry at least one example.
DOCUMENTED = [
    "spiking_moe.activity",
    "spiking_moe.functional.surrogate",
    "spiking_moe.functional.lif",
    "spiking_moe.neurons",
    "spiking_moe.encoding",
    "spiking_moe.data",
    "spiking_moe.config",
    "spiking_moe.training.trainer",
    "spiking_moe.experts",
    "spiking_moe.router",
    "spiking_moe.moe",
    "spiking_moe.models",
    "energy",
    "energy.counting",
    "energy.profiles",
    "energy.report",
]


@pytest.mark.parametrize("name", DOCUMENTED)
def test_public_modules_have_examples(name):
    module = importlib.import_module(name)
    examples = sum(len(t.examples) for t in doctest.DocTestFinder().find(module))
    assert examples > 0, f"{name} has no docstring example"


def test_doctests_are_collected_by_pytest():
    text = (ROOT / "pyproject.toml").read_text()
    assert "--doctest-modules" in text and '"spiking_moe", "energy"' in text


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports at run time (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.startswith(package):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(package))
    return found


def _module_graph(package: str) -> dict[str, set[str]]:
    files = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (ROOT / package).rglob("*.py")
    }
    return {
        name: {t for t in _imports(path, package) if t in files and t != name}
        for name, path in files.items()
        if not path.name == "__init__.py"
    }


def test_imports_go_one_way_inside_the_package():
    """No import cycle between the modules of spiking_moe (package __init__ files, which only
    re-export, aside): e.g. config reads data's dataset specs and data knows nothing of config."""
    graph = _module_graph("spiking_moe")
    graph = {name: {t for t in deps if t in graph} for name, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep] if dep in path else [node, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # data knows nothing of config: no module of the data package, its __init__ included.
    data_files = [p for n, p in _files("spiking_moe").items() if n.startswith("spiking_moe.data.")]
    assert data_files
    for path in data_files:
        imported = _imports(path, "spiking_moe.config")
        assert not imported, f"{path} imports {sorted(imported)}"
    # Only training/ talks to the energy package.
    for name, path in _files("spiking_moe").items():
        uses_energy = any(t.startswith("energy") for t in _imports(path, "energy"))
        assert not uses_energy or name.startswith("spiking_moe.training"), name


def _files(package):
    return {
        ".".join(p.relative_to(ROOT).with_suffix("").parts): p
        for p in (ROOT / package).rglob("*.py")
    }
