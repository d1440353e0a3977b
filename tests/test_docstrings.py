"""Every public name documents itself (STYLE 11: Google style with shapes).

The API reference (docs/api) is generated from these docstrings, so a name without one, or a
callable whose docstring omits its arguments or what it returns, is a hole in the docs. The
rules are napoleon's Google sections: ``Args:`` for a callable's parameters (``Attributes:``
for the fields of a dataclass or NamedTuple), ``Returns:`` or ``Yields:`` for what a function
gives back. Exceptions take a message, and are exempt from ``Args:``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import sys
import textwrap
from pathlib import Path

import pytest

# The namespaces users import from: the same list the docs' API reference is generated from.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "_ext"))
from reference import PUBLIC_NAMESPACES  # noqa: E402


def public_objects():
    seen = {}
    for namespace in PUBLIC_NAMESPACES:
        module = importlib.import_module(namespace)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj):
                seen.setdefault(id(obj), (f"{namespace}.{name}", obj))
    return sorted(seen.values(), key=lambda item: item[0])


def _sections(doc: str) -> set[str]:
    return {line.strip() for line in doc.splitlines() if line.strip().endswith(":")}


def _parameters(func) -> list[str]:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return []
    return [name for name in signature.parameters if name not in ("self", "cls")]


def _returns_a_value(func) -> bool:
    annotation = inspect.signature(func).return_annotation
    if annotation is not inspect.Signature.empty:
        return annotation not in (None, "None", "NoReturn")
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    body = tree.body[0]
    nested = {
        id(node)
        for outer in ast.walk(body)
        if outer is not body and isinstance(outer, (ast.FunctionDef, ast.Lambda))
        for node in ast.walk(outer)
    }
    return any(
        isinstance(node, (ast.Return, ast.Yield, ast.YieldFrom))
        and getattr(node, "value", None) is not None
        and id(node) not in nested
        for node in ast.walk(body)
    )


def _is_record(cls) -> bool:
    return dataclasses.is_dataclass(cls) or (issubclass(cls, tuple) and hasattr(cls, "_fields"))


def missing_sections(obj) -> list[str]:
    """What ``obj``'s docstring lacks, by the rules in this module's docstring."""
    doc = inspect.getdoc(obj) if not inspect.ismodule(obj) else obj.__doc__
    if not doc or not doc.strip():
        return ["a docstring"]
    if inspect.ismodule(obj):
        return []
    sections = _sections(doc)
    missing = []
    if inspect.isclass(obj):
        if issubclass(obj, BaseException):
            return []
        if _is_record(obj):
            if "Attributes:" not in sections and "Args:" not in sections:
                missing.append("Attributes:")
        elif _parameters(obj) and "Args:" not in sections:
            missing.append("Args:")
        return missing
    if _parameters(obj) and "Args:" not in sections:
        missing.append("Args:")
    if _returns_a_value(obj) and not sections & {"Returns:", "Yields:"}:
        missing.append("Returns:")
    return missing


@pytest.mark.parametrize(
    "qualname,obj", public_objects(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_public_name_is_documented(qualname, obj):
    missing = missing_sections(obj)
    assert not missing, f"{qualname}: docstring lacks {', '.join(missing)}"


def test_the_rules_catch_a_gap():
    """The checker itself: an undocumented return and argument are caught, a full one passes."""

    def bare(x):
        """Doubles."""
        return 2 * x

    def full(x):
        """Doubles.

        Args:
            x: a number.

        Returns:
            ``2 x``.
        """
        return 2 * x

    @dataclasses.dataclass
    class Record:
        """A record."""

        value: int

    assert missing_sections(bare) == ["Args:", "Returns:"]
    assert missing_sections(full) == []
    assert missing_sections(Record) == ["Attributes:"]
