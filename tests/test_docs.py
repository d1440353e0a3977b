"""Documentation that stays true: every public module shows a runnable example (pytest runs
them through --doctest-modules, see pyproject.toml). The import structure: test_imports.py."""

import ast
import doctest
import importlib
import re
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
    "spiking_moe.args",
    "spiking_moe.strategies",
    "spiking_moe.factory",
    "spiking_moe.transformer",
    "energy",
    "energy.counting",
    "energy.profiles",
    "energy.report",
    "energy.counts",
    "energy.rules",
    "energy.adapters",
]


@pytest.mark.parametrize("name", DOCUMENTED)
def test_public_modules_have_examples(name):
    module = importlib.import_module(name)
    examples = sum(len(t.examples) for t in doctest.DocTestFinder().find(module))
    assert examples > 0, f"{name} has no docstring example"


def test_doctests_are_collected_by_pytest():
    text = (ROOT / "pyproject.toml").read_text()
    assert "--doctest-modules" in text and '"spiking_moe", "energy"' in text


def _legend() -> set[str]:
    """The letters of the package legend (the table in ``spiking_moe.__doc__``)."""
    import spiking_moe

    return set(re.findall(r"^``([A-Z])``  ", spiking_moe.__doc__, flags=re.M))


def _shape_suffixes(path: Path) -> set[tuple[str, str]]:
    """``(identifier, suffix)`` of every name in ``path`` with a shape suffix (``x_TBD``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, ast.arg):
            names.append(node.arg)
        elif isinstance(node, ast.Attribute):
            names.append(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.append(node.name)
        for name in names:
            match = re.fullmatch(r"[a-z][a-z0-9_]*?_([A-Z0-9]*[A-Z][A-Z0-9]*)", name)
            if match:
                found.add((name, match.group(1)))
    return found


def test_one_legend_for_the_shape_letters():
    """Every shape suffix in the package uses the package legend's letters, and no module
    declares a legend of its own (a letter means one thing everywhere)."""
    legend = _legend()
    assert {"T", "B", "N", "W", "L", "X", "E", "K", "R", "D", "U", "G", "P"} <= legend
    unknown = []
    for path in sorted((ROOT / "spiking_moe").rglob("*.py")):
        for name, suffix in sorted(_shape_suffixes(path)):
            stray = set(suffix) - legend - set("0123456789")
            if stray:
                unknown.append(f"{path.relative_to(ROOT)}: {name} ({''.join(sorted(stray))})")
        if path != ROOT / "spiking_moe" / "__init__.py":
            text = path.read_text()
            assert not re.search(r"^(Legend|Letters):", text, flags=re.M), path
    assert unknown == []
