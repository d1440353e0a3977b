"""Sphinx extension of the spiking-moe docs.

- Writes the generated pages (:mod:`reference`) before Sphinx reads the sources, so the API,
  configuration and CLI references are rebuilt from the code on every build.
- Applies napoleon's Google-style parsing to code objects only (:data:`NAPOLEON_OBJECTS`).
- Resolves a Python cross-reference written with any public path of an object
  (``energy.count_operations``, or ``LMOutput`` inside a module that imports it) to the path
  it is documented under (its defining module), so docstrings can name objects the way users
  import them; a short name no import explains resolves when one documented object of the
  package has it. A name that is still not found stays a warning (and fails a ``-W`` build).
"""

from __future__ import annotations

from pathlib import Path

from reference import canonical_names, write_generated


def _generate(app) -> None:
    write_generated(Path(app.srcdir))


def _resolve_public_path(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    module = node.get("py:module")
    klass = node.get("py:class")
    candidates = [target]
    if module:
        candidates[:0] = [f"{module}.{target}"] + ([f"{module}.{klass}.{target}"] if klass else [])
    domain = env.get_domain("py")
    for candidate in candidates:
        for canonical in canonical_names(candidate):
            if canonical == target:
                continue
            resolved = domain.resolve_any_xref(
                env, node["refdoc"], app.builder, canonical, node, contnode
            )
            if resolved:
                return resolved[0][1]
    # A short name the module does not import (a docstring naming a sibling module's class):
    # resolve it when exactly one documented object of the same package has that name.
    package = (module or target).split(".")[0]
    matches = [
        name
        for name in domain.objects
        if name.endswith("." + target) and name.split(".")[0] == package
    ]
    if len(matches) == 1:
        resolved = domain.resolve_any_xref(
            env, node["refdoc"], app.builder, matches[0], node, contnode
        )
        if resolved:
            return resolved[0][1]
    return None


#: What napoleon's Google parser reads. Not data, attributes or properties: it takes their
#: first line's ``text: more text`` for ``type: description``, and this package's prose
#: (``#: Folders left out of the corpus: test suites ...``) would become a broken type link.
NAPOLEON_OBJECTS = ("module", "class", "exception", "function", "method", "classmethod")


def _napoleon_for_code_only(app) -> None:
    from sphinx.ext.napoleon import _process_docstring

    listeners = app.events.listeners["autodoc-process-docstring"]
    for listener in list(listeners):
        if listener.handler is _process_docstring:
            app.disconnect(listener.id)

    def process(app, what, name, obj, options, lines):
        if what in NAPOLEON_OBJECTS:
            _process_docstring(app, what, name, obj, options, lines)

    app.connect("autodoc-process-docstring", process)


def _dataclass_factories(app, what, name, obj, options, signature, return_annotation):
    """A dataclass field with a ``default_factory`` shows as ``=<factory>``, which Sphinx
    cannot parse (it then splits ``dict[str, float]`` at the comma): show ``=...``."""
    if signature and "<factory>" in signature:
        return signature.replace("<factory>", "..."), return_annotation
    return None


def setup(app):
    app.connect("autodoc-process-signature", _dataclass_factories)
    app.setup_extension("sphinx.ext.napoleon")
    _napoleon_for_code_only(app)
    app.connect("builder-inited", _generate)
    app.connect("missing-reference", _resolve_public_path)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
