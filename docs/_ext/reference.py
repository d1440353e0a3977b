"""The generated parts of the docs: API pages, the configuration and the CLI reference.

Each is built from the code it documents (``__all__`` and docstrings, the config dataclasses,
the argparse parsers), so it cannot drift; ``spiking_moe_docs`` writes them when Sphinx starts,
and ``tests/test_docs_site.py`` checks them without Sphinx.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import inspect
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path

#: The namespaces users import from; every name in their ``__all__`` gets an API entry.
PUBLIC_NAMESPACES = (
    "spiking_moe",
    "spiking_moe.functional",
    "spiking_moe.nir",
    "spiking_moe.training",
    "energy",
)

#: API sections, in reading order: (title, modules whose public names it holds). A module not
#: listed lands in the last section, so a new module is documented before it is placed.
API_SECTIONS = (
    (
        "Neurons and spikes",
        (
            "spiking_moe.neurons",
            "spiking_moe.functional",
            "spiking_moe.functional.lif",
            "spiking_moe.functional.surrogate",
            "spiking_moe.functional.event",
            "spiking_moe.synapses",
            "spiking_moe.encoding",
            "spiking_moe.activity",
        ),
    ),
    (
        "Routing and experts",
        (
            "spiking_moe.router",
            "spiking_moe.dispatch",
            "spiking_moe.experts",
            "spiking_moe.moe",
            "spiking_moe.strategies",
        ),
    ),
    (
        "Models",
        ("spiking_moe.models", "spiking_moe.transformer", "spiking_moe.attention"),
    ),
    ("Configuration", ("spiking_moe.args", "spiking_moe.config")),
    ("Data", ("spiking_moe.data",)),
    (
        "Training and experiments",
        (
            "spiking_moe.training",
            "spiking_moe.experiment",
            "spiking_moe.evaluation",
            "spiking_moe.sweep",
            "spiking_moe.cli",
            "spiking_moe.quantization",
            "spiking_moe.parallel",
        ),
    ),
    ("Energy", ("energy",)),
    ("NIR", ("spiking_moe.nir",)),
    ("Kernels", ("spiking_moe.functional.kernels",)),
    ("Other", ()),
)


@dataclasses.dataclass
class ApiEntry:
    """One documented object: where it is defined and the public paths users import it by."""

    module: str
    name: str
    kind: str  # autodoc directive: autoclass, autofunction, autoexception, autodata
    imported_as: list[str] = dataclasses.field(default_factory=list)

    @property
    def target(self) -> str:
        return f"{self.module}.{self.name}"


def _assigned_names(module: types.ModuleType) -> frozenset[str]:
    """Names a module assigns at top level (not the ones it imports)."""
    return _assigned_names_in(module.__name__)


@functools.cache
def _assigned_names_in(module_name: str) -> frozenset[str]:
    import ast

    try:
        tree = ast.parse(inspect.getsource(sys.modules[module_name]))
    except (OSError, TypeError):
        return frozenset()
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return frozenset(names)


def _data_home(namespace: types.ModuleType, name: str, obj: object) -> tuple[str, str]:
    """``(module, name)`` where a constant is assigned (and its ``#:`` comment is): among the
    package's modules that bind the same object, the one whose source assigns it, preferring
    the same name; else the deepest module that exports it."""
    package = namespace.__name__.split(".")[0]
    modules = [
        (mod_name, mod)
        for mod_name, mod in list(sys.modules.items())
        if mod_name.split(".")[0] == package and isinstance(mod, types.ModuleType)
    ]
    assigned = [
        (mod_name, bound)
        for mod_name, mod in modules
        for bound in _assigned_names(mod)
        if getattr(mod, bound, None) is obj
    ]
    same_name = [home for home in assigned if home[1] == name]
    if len(same_name) == 1:
        return same_name[0]
    if len(assigned) == 1:
        return assigned[0]
    holders = [
        m
        for m, mod in modules
        if getattr(mod, name, None) is obj and name in getattr(mod, "__all__", ())
    ]
    return max(holders, key=lambda m: m.count(".")), name


def _real_name(namespace: types.ModuleType, name: str, obj: object) -> str:
    """The name an object is documented under: its own ``__name__``, or a constant's
    assigned name (``spiking_moe.config.ROUTERS`` is ``spiking_moe.args.ROUTER_KINDS``)."""
    if _kind(obj) == "autodata":
        return _data_home(namespace, name, obj)[1]
    return getattr(obj, "__name__", name)


def _defining_module(namespace: types.ModuleType, name: str, obj: object) -> str:
    """The module an object is defined in (for a constant: where it is assigned)."""
    module = getattr(obj, "__module__", None)
    if module and (inspect.isclass(obj) or inspect.isroutine(obj)):
        return module
    return _data_home(namespace, name, obj)[0]


def _kind(obj: object) -> str:
    if inspect.isclass(obj):
        return "autoexception" if issubclass(obj, BaseException) else "autoclass"
    if inspect.isroutine(obj):
        return "autofunction"
    return "autodata"


def _walk_public(namespace_name: str, seen: set[str]) -> Iterator[tuple[str, str, object]]:
    """``(public path, name, object)`` for the namespace's ``__all__``; a submodule listed there
    contributes its own ``__all__`` (``spiking_moe.data``, ``energy.profiles``)."""
    if namespace_name in seen:
        return
    seen.add(namespace_name)
    namespace = importlib.import_module(namespace_name)
    for name in namespace.__all__:
        obj = getattr(namespace, name)
        if inspect.ismodule(obj):
            if obj.__name__.startswith(namespace_name.split(".")[0]):
                yield from _walk_public(obj.__name__, seen)
            continue
        yield namespace_name, name, obj


#: Modules documented beyond those the public names live in: user-facing helpers that the
#: guides and docstrings point to (the experiment runner the CLI calls, quantization,
#: expert parallelism, the counting rules, the fused kernels and their maths).
EXTRA_MODULES = (
    "spiking_moe.parallel",
    "spiking_moe.quantization",
    "spiking_moe.experiment",
    "spiking_moe.evaluation",
    "spiking_moe.sweep",
    "spiking_moe.cli",
    "spiking_moe.functional.kernels",
    *(
        f"spiking_moe.functional.kernels.{name}"
        for name in ("protocol", "cpu_fused", "triton_lif", "event_cpu", "triton_event")
    ),
    *(f"spiking_moe.functional.kernels.{name}" for name in ("calibration", "jit")),
    "energy.rules",
)


def _own_names(module_name: str) -> list[tuple[str, object]]:
    """The names of a module's ``__all__`` that the module itself defines."""
    module = importlib.import_module(module_name)
    own = []
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name)
        if inspect.ismodule(obj):
            continue
        if _defining_module(module, name, obj) == module_name:
            own.append((name, obj))
    return own


def documented_modules() -> list[str]:
    """Every module with an API page: the public namespaces, the modules their names are
    defined in, the submodules they list, and :data:`EXTRA_MODULES`."""
    modules = set(PUBLIC_NAMESPACES) | set(EXTRA_MODULES)
    seen: set[str] = set()
    for namespace_name in PUBLIC_NAMESPACES:
        for public_path, name, obj in _walk_public(namespace_name, seen):
            modules.add(public_path)
            modules.add(_defining_module(importlib.import_module(public_path), name, obj))
    return sorted(modules)


def api_entries() -> dict[str, list[ApiEntry]]:
    """Documented objects grouped by defining module, in ``__all__`` order, each with the
    public paths it is re-exported under."""
    grouped: dict[str, list[ApiEntry]] = {}
    by_target: dict[str, ApiEntry] = {}
    modules = documented_modules()
    for module in modules:
        grouped[module] = []
        for name, obj in _own_names(module):
            real_name = _real_name(importlib.import_module(module), name, obj)
            if f"{module}.{real_name}" in by_target:
                continue
            entry = ApiEntry(module, real_name, _kind(obj))
            by_target[entry.target] = entry
            grouped[module].append(entry)
    seen: set[str] = set()
    exported = [
        (public_path, name, obj)
        for namespace_name in PUBLIC_NAMESPACES
        for public_path, name, obj in _walk_public(namespace_name, seen)
    ]
    # What a documented module re-exports from elsewhere is documented where it lives.
    for module in modules:
        namespace = importlib.import_module(module)
        for name in getattr(namespace, "__all__", ()):
            if not inspect.ismodule(getattr(namespace, name)):
                exported.append((module, name, getattr(namespace, name)))
    for public_path, name, obj in exported:
        namespace = importlib.import_module(public_path)
        module = _defining_module(namespace, name, obj)
        real_name = _real_name(namespace, name, obj)
        entry = by_target.get(f"{module}.{real_name}")
        if entry is None:  # public, but missing from its own module's __all__
            entry = by_target[f"{module}.{real_name}"] = ApiEntry(module, real_name, _kind(obj))
            grouped.setdefault(module, []).append(entry)
        if public_path != module:
            entry.imported_as.append(f"{public_path}.{name}")
    return grouped


def canonical_names(path: str) -> list[str]:
    """Where the object ``path`` names may be documented, best first (``energy.count_operations``
    -> ``energy.counting.count_operations``; a constant -> where it is assigned; a method ->
    under the class the path names, then under the class that defines it). Empty when ``path``
    names nothing importable. Lets docstrings and pages refer to an object by any public path."""
    parts = path.split(".")
    try:
        obj = importlib.import_module(parts[0])
    except ImportError:
        return []
    parent = None
    # Attribute lookup first, as Python resolves ``spiking_moe.dispatch`` (the function the
    # package exports, not the submodule of the same name); a submodule only when no attribute.
    for depth, attr in enumerate(parts[1:], start=2):
        parent = obj
        if hasattr(obj, attr):
            obj = getattr(obj, attr)
            continue
        try:
            obj = importlib.import_module(".".join(parts[:depth]))
        except ImportError:
            return []
    if inspect.ismodule(obj):
        return [obj.__name__]
    names = []
    if inspect.isclass(parent) and len(parts) > 1:
        names += [f"{name}.{parts[-1]}" for name in canonical_names(".".join(parts[:-1]))]
    if inspect.isclass(obj) or inspect.isroutine(obj):
        owner = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", None)
        if owner and qualname and "<" not in qualname:
            names.append(f"{owner}.{qualname}")
    elif inspect.ismodule(parent):
        names.append(".".join(_data_home(parent, parts[-1], obj)))
    return list(dict.fromkeys(names))


def canonical_name(path: str) -> str | None:
    """The first of :func:`canonical_names`, or None."""
    names = canonical_names(path)
    return names[0] if names else None


def _section_of(module: str) -> str:
    best, best_len = "Other", -1
    for title, prefixes in API_SECTIONS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = title, len(prefix)
    return best


def _heading(text: str, char: str) -> str:
    return f"{text}\n{char * len(text)}\n"


def api_pages() -> dict[str, str]:
    """``{relative path: reStructuredText}`` of the API reference: an index and one page per
    defining module (its docstring, which holds the maths once, then its public names)."""
    grouped = api_entries()
    pages: dict[str, str] = {}
    by_section: dict[str, list[str]] = {title: [] for title, _ in API_SECTIONS}
    for module in sorted(grouped):
        by_section[_section_of(module)].append(module)
        lines = [_heading(f"``{module}``", "="), f".. automodule:: {module}", "   :no-members:", ""]
        for entry in grouped[module]:
            lines.append(f".. {entry.kind}:: {entry.target}")
            if entry.kind in ("autoclass", "autoexception"):
                lines += ["   :members:", "   :show-inheritance:"]
                stop = _public_bases(entry)
                if stop:
                    lines.append(f"   :inherited-members: {', '.join(stop)}")
            if entry.kind == "autodata":
                lines.append("   :no-value:" if _long_value(entry) else "   :annotation:")
            lines.append("")
            if entry.imported_as:
                paths = ", ".join(f"``{path}``" for path in sorted(set(entry.imported_as)))
                lines += [f"   Also importable as {paths}.", ""]
        reexports = _reexport_list(module)
        if reexports:
            lines += [_heading("Public names", "-"), *reexports, ""]
        pages[f"{module}.rst"] = "\n".join(lines)
    index = [
        _heading("API reference", "="),
        "Generated from the docstrings of every name in ``spiking_moe.__all__``, "
        "``spiking_moe.functional``, ``spiking_moe.nir``, ``spiking_moe.training`` and "
        "``energy``. Each page is the module an object is defined in: its docstring (the maths, "
        "once) and then its public names, with where else they can be imported from.",
        "",
    ]
    for title, _ in API_SECTIONS:
        modules = by_section[title]
        if not modules:
            continue
        index += [_heading(title, "-"), ".. toctree::", "   :maxdepth: 1", ""]
        index += [f"   {module}" for module in modules]
        index.append("")
    pages["index.rst"] = "\n".join(index)
    return pages


def _public_bases(entry: ApiEntry) -> list[str]:
    """For a class built on a private base of this package (``SpikingMoELM`` on
    ``_LanguageModel``), the bases whose members are not repeated on its page (everything from
    the first documented or foreign base on), so the methods it inherits from the private base
    (``generate``) are documented on it. Empty when no base is private."""
    cls = getattr(importlib.import_module(entry.module), entry.name)
    packages = {namespace.split(".")[0] for namespace in PUBLIC_NAMESPACES}
    bases = cls.__mro__[1:]
    private = [
        b for b in bases if b.__name__.startswith("_") and b.__module__.split(".")[0] in packages
    ]
    if not private:
        return []
    return sorted({b.__name__ for b in bases if b not in private})


def _reexport_list(module: str) -> list[str]:
    """A linked list of the names a namespace re-exports from elsewhere."""
    namespace = importlib.import_module(module)
    items = []
    for name in getattr(namespace, "__all__", ()):
        obj = getattr(namespace, name)
        if inspect.ismodule(obj):
            items.append(f"- :mod:`{obj.__name__}`")
            continue
        defining = _defining_module(namespace, name, obj)
        if defining == module:
            continue
        role = {"autoclass": "class", "autoexception": "exc", "autofunction": "func"}.get(
            _kind(obj), "data"
        )
        real_name = _real_name(namespace, name, obj)
        items.append(f"- :{role}:`{name} <{defining}.{real_name}>`")
    return items


def _long_value(entry: ApiEntry) -> bool:
    value = getattr(importlib.import_module(entry.module), entry.name)
    return len(repr(value)) > 80


# --------------------------------------------------------------------------- configuration


def _rst_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("*", "\\*").replace("|", "\\|").replace("`", "\\`")


def _toml_value(value: object) -> str:
    """A default as it is written in a TOML file (``"subtract"``, ``true``); None: unset."""
    import json

    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def config_rows() -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    """``[(section, [(key, type, default, description), ...]), ...]``: every TOML key of an
    experiment config, from the config dataclasses' declarations (``Options.describe``)."""
    from spiking_moe.args import Options
    from spiking_moe.config import ExperimentConfig

    sections: list[tuple[str, list[tuple[str, str, str, str]]]] = []

    def visit(path: str, cls: type) -> None:
        rows = []
        nested = []
        for name, type_name, default, doc in cls.describe():
            if isinstance(default, Options):
                nested.append((f"{path}.{name}", type(default)))
                continue
            rows.append((f"{path}.{name}", type_name, _toml_value(default), doc))
        sections.append((path, rows))
        for nested_path, nested_cls in nested:
            visit(nested_path, nested_cls)

    top = []
    for f in dataclasses.fields(ExperimentConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, Options):
            visit(f.name, type(default))
        else:
            top.append(
                (f.name, "str", _toml_value(default), "The experiment's name (its run folder).")
            )
    return [("top level", top), *sections]


def config_reference() -> str:
    """The configuration reference page (reStructuredText)."""
    from spiking_moe.args import FLAT_NAMES

    lines = [
        _heading("Configuration reference", "="),
        "Every key of an experiment's TOML file, with its type, default and allowed values. "
        "Generated from the config dataclasses (:mod:`spiking_moe.config`, "
        ":mod:`spiking_moe.args`) when the docs are built, so it lists exactly what "
        ":func:`spiking_moe.config.load_config` accepts; an unknown key or a value outside "
        "these is refused with an error that names the key. Override any key on the command "
        "line with ``--set section.key=value``.",
        "",
    ]
    for section, rows in config_rows():
        if not rows:
            continue
        title = "Top level" if section == "top level" else f"``[{section}]``"
        lines += [
            _heading(title, "-"),
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 25 12 13 50",
            "",
            "   * - key",
            "     - type",
            "     - default",
            "     - meaning",
        ]
        for key, type_name, default, doc in rows:
            lines += [
                f"   * - ``{key}``",
                f"     - ``{type_name}``",
                f"     - ``{default}``",
                f"     - {_rst_escape(doc) or '(undocumented)'}",
            ]
        lines.append("")
    lines += [
        _heading("Flat names", "-"),
        "The models' constructors also take these flat keywords (``SpikingMoEClassifier(..., "
        "num_experts=8)``); each is one key above.",
        "",
        ".. list-table::",
        "   :header-rows: 1",
        "",
        "   * - flat keyword",
        "     - key",
    ]
    for flat, (path, _) in FLAT_NAMES.items():
        lines += [f"   * - ``{flat}``", f"     - ``model.{path}``"]
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def _option_rows(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """``(argument, meaning)`` rows, the meaning already reStructuredText."""
    rows = []
    for action in parser._actions:  # argparse has no public accessor; sphinx-argparse reads it too
        if isinstance(action, argparse._HelpAction):
            continue
        name = ", ".join(action.option_strings) or action.dest
        if action.option_strings and action.nargs != 0:
            name += f" {action.metavar or action.dest.upper()}"
        help_text = ((action.help or "") % {**vars(action), "prog": parser.prog}).strip()
        parts = [_rst_escape(help_text.rstrip(".") + ".")] if help_text else []
        if action.choices:
            parts.append(f"Choices: {', '.join(f'``{c}``' for c in action.choices)}.")
        if action.required:
            parts.append("Required.")
        elif action.default not in (None, False, argparse.SUPPRESS, [], ()) and action.nargs != 0:
            shown = repr(action.default) if isinstance(action.default, str) else action.default
            parts.append(f"Default: ``{shown}``.")
        rows.append((name, " ".join(parts)))
    return rows


def cli_reference() -> str:
    """The command-line reference page (reStructuredText), from the commands' parsers."""
    from spiking_moe.cli import PARSERS

    lines = [
        _heading("Command-line reference", "="),
        "The console scripts ``pip install`` puts on the path, generated from their argparse "
        "parsers (:data:`spiking_moe.cli.PARSERS`). Every command exits with 0 on success and 2 "
        "with a message naming the problem on bad input (config, override, checkpoint, "
        "missing file). Each ``experiments/*.py`` script is the same command.",
        "",
    ]
    for prog, build in PARSERS.items():
        parser = build()
        usage = " ".join(parser.format_usage().removeprefix("usage: ").split())
        lines += [
            _heading(f"``{prog}``", "-"),
            _rst_escape(parser.description or ""),
            "",
            ".. code-block:: text",
            "",
            textwrap.indent(
                textwrap.fill(usage, 96, subsequent_indent="    ", break_on_hyphens=False), "   "
            ),
            "",
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 30 70",
            "",
            "   * - argument",
            "     - meaning",
        ]
        for name, text in _option_rows(parser):
            lines += [f"   * - ``{name}``", f"     - {text}"]
        lines.append("")
    return "\n".join(lines)


def write_generated(docs_dir: Path) -> list[Path]:
    """Write every generated page under ``docs_dir``; only files whose text changed are
    rewritten (Sphinx rebuilds what changed). Returns the paths written."""
    outputs = {f"api/{name}": text for name, text in api_pages().items()}
    outputs["reference/config.rst"] = config_reference()
    outputs["reference/cli.rst"] = cli_reference()
    written = []
    for relative, text in outputs.items():
        path = docs_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written
