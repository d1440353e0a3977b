"""The docs site's generated parts cover the code (docs/_ext/reference.py), without Sphinx:
every public name has an API entry, every config key and every console script a reference
row. The build itself (with -W, tutorials included) runs in CI (.ci/run)."""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "_ext"))
sys.path.insert(0, str(ROOT / "docs" / "tools"))

import reference  # noqa: E402
from check_site import remote_resources  # noqa: E402


def test_api_reference_documents_every_public_name():
    pages = "\n".join(reference.api_pages().values())
    documented = set(
        re.findall(r"^\.\. auto(?:class|function|exception|data):: (\S+)$", pages, re.M)
    )
    for namespace in reference.PUBLIC_NAMESPACES:
        module = importlib.import_module(namespace)
        for name in module.__all__:
            obj = getattr(module, name)
            if hasattr(obj, "__file__"):  # a submodule: its own page
                assert f".. automodule:: {obj.__name__}" in pages, obj.__name__
                continue
            target = reference.canonical_name(f"{namespace}.{name}")
            if target is None:  # data: documented where it is defined
                target = ".".join(reference._data_home(module, name, obj))
            assert target in documented, f"{namespace}.{name} ({target}) has no API entry"


def _has_doc_comment(module_name: str, name: str) -> bool:
    """Whether a module-level assignment of ``name`` carries a ``#:`` comment above it or a
    string right after it (what autodoc shows for data; without it, the value's type's doc)."""
    import ast

    source = Path(importlib.import_module(module_name).__file__).read_text()
    lines = source.splitlines()
    body = ast.parse(source).body
    for index, node in enumerate(body):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            after = body[index + 1] if index + 1 < len(body) else None
            return lines[node.lineno - 2].strip().startswith("#:") or (
                isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            )
    return False


def test_every_documented_constant_has_a_doc_comment():
    pages = "\n".join(reference.api_pages().values())
    constants = re.findall(r"^\.\. autodata:: (\S+)$", pages, re.M)
    assert len(constants) > 20
    missing = [c for c in constants if not _has_doc_comment(*c.rsplit(".", 1))]
    assert not missing, f"constants without a #: doc comment: {missing}"


def test_every_api_page_is_in_the_index():
    pages = reference.api_pages()
    index = pages.pop("index.rst")
    for page in pages:
        assert f"   {page.removesuffix('.rst')}\n" in index, page


def _config_keys(cls, prefix: str) -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            keys += _config_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def test_config_reference_lists_every_key():
    from spiking_moe.config import ExperimentConfig, flatten_config

    text = reference.config_reference()
    keys = set(_config_keys(ExperimentConfig, "")) | set(flatten_config(ExperimentConfig()))
    assert len(keys) > 70  # the walk found the nested sections
    missing = [key for key in sorted(keys) if f"``{key}``" not in text]
    assert not missing, f"config keys missing from the reference: {missing}"


def test_config_reference_shows_allowed_values_and_defaults():
    rows = dict(
        (key, (type_name, default, doc))
        for _, section in reference.config_rows()
        for key, type_name, default, doc in section
    )
    type_name, default, doc = rows["model.neuron.reset"]
    assert (type_name, default) == ("str", '"subtract"') and "['subtract', 'zero']" in doc


def test_cli_reference_covers_every_console_script():
    from spiking_moe.cli import PARSERS

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(PARSERS) == set(scripts)
    text = reference.cli_reference()
    for prog, build in PARSERS.items():
        parser = build()
        assert parser.prog == prog
        assert f"``{prog}``" in text
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"``{flag}" in text, f"{prog} {flag} missing from the CLI reference"


def test_readme_is_a_landing_page_whose_links_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 200
    links = re.findall(r"\]\(((?!https?:)[^)#]+)\)", text)
    assert links
    for link in links:
        assert (ROOT / link).exists(), f"README links to a missing file: {link}"


def test_offline_check_flags_remote_resources(tmp_path):
    (tmp_path / "index.html").write_text(
        '<a href="https://example.org">a link is fine</a>\n<script src="_static/local.js"></script>\n'
    )
    assert remote_resources(tmp_path) == []
    (tmp_path / "page.html").write_text(
        '<script src="https://cdn.example.org/mathjax.js"></script>'
    )
    (tmp_path / "style.css").write_text("@import url('https://fonts.googleapis.com/css?family=X');")
    found = remote_resources(tmp_path)
    assert [line.split(":")[0] for line in found] == ["page.html", "style.css"]
    run = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "tools" / "check_site.py"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and "would not work offline" in run.stdout


@pytest.mark.parametrize("tutorial", sorted((ROOT / "docs" / "tutorials").glob("[0-9][0-9]_*.py")))
def test_tutorial_has_a_title_and_sections(tutorial):
    """sphinx-gallery needs an RST title in the module docstring; the build runs the code."""
    text = tutorial.read_text()
    assert re.match(r'"""\n.+\n=+\n', text), f"{tutorial.name}: no RST title in its docstring"
    assert "# %%" in text
