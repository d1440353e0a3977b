"""Sphinx configuration of the spiking-moe docs.

Build (after ``pip install -e ".[docs]"``): ``python3 -m sphinx -W --keep-going -b html docs
site``. ``-W`` turns every warning (a broken cross-reference, a docstring RST error, a failing
tutorial) into a failed build; CI runs exactly that command.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path[:0] = [str(ROOT), str(DOCS / "_ext")]
# The tutorials draw with matplotlib: no display needed.
os.environ.setdefault("MPLBACKEND", "Agg")

project = "spiking-moe"
author = "spiking-moe developers"
copyright = "2026, spiking-moe developers"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    # MathJax served from the site itself (the default loads it from a CDN): the built site
    # must render offline, from disk or `python3 -m http.server`.
    "sphinx-mathjax-offline",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
    "spiking_moe_docs",
]

# Code-heavy prose: "--set" and 'quotes' stay as typed (no en dashes or curly quotes).
smartquotes = False
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "tutorials/README.rst", "tutorials/*.py", "tools"]

# Every cross-reference must resolve: a broken one is a warning, and -W fails the build.
nitpicky = True
# Names outside this package are written but not linked: the build is offline, so no
# intersphinx inventories of Python, PyTorch or NumPy can be fetched.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|numpy|np|nn|nir|snntorch|norse|tonic|h5py|sklearn|matplotlib)(\..*)?"),
    (r"py:.*", r"(typing|collections|pathlib|argparse|logging|dataclasses|enum|os|io)\..*"),
    (r"py:.*", r"(Tensor|Module|Path|PathLike|Callable|Iterable|Iterator|Mapping|Sequence)"),
    (r"py:.*", r"(TextIO|Generator|Literal|Any|Self|Enum|Parameter|Dataset|Optimizer)"),
    (r"py:.*", r"(SummaryWriter|ArgumentParser|Namespace|ModuleList|ParameterList)"),
    # Private bases (show-inheritance) and helpers are not part of the API.
    (r"py:.*", r".*\._[A-Za-z]\w*"),
    # Type variables in signatures (``Stats``) are not documented objects.
    (r"py:class", r".*\.Stats"),
]

# autodoc + napoleon: Google-style sections; fields of records as a field list (not duplicate
# attribute entries next to the dataclass fields autodoc finds).
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
napoleon_use_rtype = False

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

sphinx_gallery_conf = {
    "examples_dirs": "tutorials",
    "gallery_dirs": "auto_tutorials",
    # Run every tutorial, not only plot_*.py; a failing one fails the build.
    "filename_pattern": r"/\d\d_",
    "abort_on_example_error": True,
    # In the order of their numbers (the default sorts by code length).
    "within_subsection_order": "FileNameSortKey",
    "only_warn_on_example_error": False,
    "remove_config_comments": True,
    "download_all_examples": False,
    "image_scrapers": ("matplotlib",),
    "reset_modules": ("matplotlib",),
    "show_memory": False,
    "min_reported_time": 1,
    # The execution-times pages load jQuery and DataTables from CDNs: the site must work
    # offline (docs/tools/check_site.py found them).
    "write_computation_times": False,
    # The scripts are the tutorials' single source; no binder or notebooks from a CDN.
    "first_notebook_cell": None,
}

html_theme = "furo"
html_title = "spiking-moe"
html_static_path = ["_static"]
html_theme_options = {
    "source_repository": "",
    "navigation_with_keys": True,
}
html_show_sourcelink = False
# The site works opened from disk (file://) as well as served.
html_use_opensearch = ""
