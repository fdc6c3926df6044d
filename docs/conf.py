"""Sphinx configuration for torchkit's documentation."""

from __future__ import annotations

import torchkit

project = "torchkit"
author = "torchkit developers"
copyright = "2026, torchkit developers"
version = release = torchkit.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
]
# No intersphinx: CI builds the docs without network access.

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# autodoc: document the public path (``torchkit.EarlyStopping``), types in the signature.
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True}
autosummary_generate = False
add_module_names = False
python_use_unqualified_type_names = True

# napoleon: Google-style docstrings only.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# sphinx.ext.doctest (``sphinx-build -b doctest``) runs examples in the same namespace
# that pytest's doctest_namespace fixture provides (see conftest.py).
doctest_global_setup = """
import torch
from torch import nn
import torchkit as tk
torch.manual_seed(0)
"""

myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"torchkit {release}"
html_static_path = ["_static"]
