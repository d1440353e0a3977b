"""The package's imports go one way: no cycles (lazy imports inside functions count), no lower
layer importing a higher one, and no lower layer probing a higher one's objects by name
(``getattr(m, "shard_experts")``: an import cycle hidden by duck typing).

The layers, lowest first, are the architecture of ``spiking_moe`` (DESIGN.md): a module may
import modules of its own layer or below. The checks are run on small synthetic packages too,
so they are known to fail on the faults they look for.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Lowest first. A module belongs to the first layer with a prefix matching its dotted name
#: (relative to the package); a package's ``__init__`` is named by the package.
LAYERS: list[tuple[str, ...]] = [
    ("functional", "activity", "encoding", "data", "plotting"),
    ("args",),
    ("neurons", "synapses", "config"),
    ("experts", "router", "attention"),
    ("dispatch",),
    ("strategies",),
    ("moe",),
    ("models", "parallel", "quantization"),
    ("transformer",),
    ("nir", "factory"),
    ("training",),
    ("experiment", "evaluation", "compare", "sweep"),
    ("cli",),
]


def _module_name(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path, root: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports anywhere (top level, functions, methods;
    ``TYPE_CHECKING`` blocks aside: they do not run)."""
    tree = ast.parse(path.read_text())
    module = _module_name(path, root)
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target == package or target.startswith(package + "."):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == package)
    return found


def module_graph(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the package's files, package ``__init__`` files
    included (importing a package runs its ``__init__``); the top-level ``__init__`` is left
    out, being the public face that imports everything."""
    files = {_module_name(p, root): p for p in (root / package).rglob("*.py")}
    files.pop(package)  # every submodule import runs it anyway
    return {
        name: {t for t in _imports(path, root, package) if t in files and t != name}
        for name, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state:
                cycle = visit(dep, [*path, dep])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [name])
            if cycle:
                return cycle
    return None


def layer_of(name: str, package: str, layers) -> int:
    relative = name.removeprefix(package + ".")
    for rank, prefixes in enumerate(layers):
        if any(relative == p or relative.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{name} belongs to no layer: add it to LAYERS")


def upward_imports(graph, package: str, layers) -> list[str]:
    return [
        f"{name} (layer {layer_of(name, package, layers)}) imports {dep} "
        f"(layer {layer_of(dep, package, layers)})"
        for name, deps in sorted(graph.items())
        for dep in sorted(deps)
        if layer_of(dep, package, layers) > layer_of(name, package, layers)
    ]


def _defined_names(path: Path) -> set[str]:
    """Methods, class attributes and ``self.x = ...`` attributes defined in a module."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
    return {n for n in names if not (n.startswith("__") and n.endswith("__"))}


def _probed_names(path: Path) -> set[str]:
    """Names looked up by string: ``getattr(x, "name", ...)``, ``hasattr(x, "name")``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            names.add(node.args[1].value)
    return names


def duck_typed_upward(root: Path, package: str, layers) -> list[str]:
    """Lower modules probing by name an attribute that only higher modules define."""
    files = {_module_name(p, root): p for p in (root / package).rglob("*.py")}
    files.pop(package, None)
    defined = {name: _defined_names(path) for name, path in files.items()}
    found = []
    for name, path in sorted(files.items()):
        rank = layer_of(name, package, layers)
        for probe in sorted(_probed_names(path)):
            definers = [m for m, names in defined.items() if probe in names]
            if definers and all(layer_of(m, package, layers) > rank for m in definers):
                found.append(f"{name} probes {probe!r}, defined only above it in {definers}")
    return found


# --------------------------------------------------------------------------- the package


def test_no_import_cycle_lazy_imports_included():
    cycle = find_cycle(module_graph(ROOT, "spiking_moe"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_lower_layer_imports_a_higher_one():
    graph = module_graph(ROOT, "spiking_moe")
    assert upward_imports(graph, "spiking_moe", LAYERS) == []
    # Every module has a layer (a new module must be placed in the architecture).
    for name in graph:
        layer_of(name, "spiking_moe", LAYERS)


def test_no_lower_layer_reaches_a_higher_one_by_duck_typing():
    assert duck_typed_upward(ROOT, "spiking_moe", LAYERS) == []


def test_only_training_uses_the_energy_package_and_energy_imports_none_of_ours():
    for path in (ROOT / "spiking_moe").rglob("*.py"):
        name = _module_name(path, ROOT)
        if _imports(path, ROOT, "energy"):
            assert name.startswith("spiking_moe.training"), name
    for path in (ROOT / "energy").rglob("*.py"):
        assert not _imports(path, ROOT, "spiking_moe"), path


# --------------------------------------------------------------------------- the checks


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    (tmp_path / "pkg" / "__init__.py").touch()
    return tmp_path


FAKE_LAYERS = [("low",), ("high",)]


def test_the_checks_catch_a_lazy_import_cycle(tmp_path):
    root = _package(
        tmp_path,
        {
            "low.py": "def f():\n    from .high import g\n    return g\n",
            "high.py": "from .low import f\n",
        },
    )
    graph = module_graph(root, "pkg")
    assert find_cycle(graph) in (
        ["pkg.high", "pkg.low", "pkg.high"],
        ["pkg.low", "pkg.high", "pkg.low"],
    )
    assert upward_imports(graph, "pkg", FAKE_LAYERS) == [
        "pkg.low (layer 0) imports pkg.high (layer 1)"
    ]


def test_the_checks_catch_an_import_through_a_package_init(tmp_path):
    root = _package(
        tmp_path,
        {
            "high/__init__.py": "from .impl import H\n",
            "high/impl.py": "from ..low import L\nclass H: ...\n",
            "low.py": "from .high import H\nclass L: ...\n",
        },
    )
    graph = module_graph(root, "pkg")
    assert find_cycle(graph) is not None
    assert upward_imports(graph, "pkg", FAKE_LAYERS)


def test_the_checks_catch_duck_typing_across_layers(tmp_path):
    """The shape of the old moe <-> parallel pair: the lower module found the higher one's
    objects by probing for a method only they define, instead of importing them."""
    root = _package(
        tmp_path,
        {
            "low.py": """
                def shard(model):
                    return [m for m in model if callable(getattr(m, "shard_experts", None))]
            """,
            "high.py": """
                from .low import shard
                class Layer:
                    def shard_experts(self): ...
            """,
        },
    )
    assert duck_typed_upward(root, "pkg", FAKE_LAYERS) == [
        "pkg.low probes 'shard_experts', defined only above it in ['pkg.high']"
    ]
    (root / "pkg" / "low.py").write_text("class Base:\n    def shard_experts(self): ...\n")
    assert duck_typed_upward(root, "pkg", FAKE_LAYERS) == []


@pytest.mark.parametrize("name", ["spiking_moe.moe", "spiking_moe.parallel"])
def test_moe_and_parallel_go_one_way(name):
    """moe knows nothing of parallel; parallel imports moe (it finds the layers to shard)."""
    graph = module_graph(ROOT, "spiking_moe")
    assert "spiking_moe.parallel" not in graph["spiking_moe.moe"]
    assert "spiking_moe.moe" in graph["spiking_moe.parallel"]
    assert name in graph
