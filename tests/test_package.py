"""Packaging contracts: light import, an exact ``__all__``, one version, documented API."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import torchkit as tk

ROOT = Path(__file__).resolve().parent.parent

# Optional packages (extras, or what they pull in) that ``import torchkit`` must not load.
OPTIONAL = [
    "tensorboard",
    "torchvision",
    "matplotlib",
    "safetensors",
    "torchao",
    "sklearn",
    "pandas",
    "scipy",
    "hypothesis",
    "PIL",
]

_LOADED = """
import json, sys
import torch
before = {name.partition(".")[0] for name in sys.modules}
import torchkit
after = {name.partition(".")[0] for name in sys.modules}
print(json.dumps({"before": sorted(before), "after": sorted(after)}))
"""


def test_import_loads_no_optional_package() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _LOADED], capture_output=True, text=True, check=True
    )
    loaded = json.loads(result.stdout)
    added_by_torchkit = set(loaded["after"]) - set(loaded["before"])
    assert not added_by_torchkit & set(OPTIONAL), (
        f"import torchkit loaded {sorted(added_by_torchkit & set(OPTIONAL))}; "
        "import optional packages inside the function that needs them"
    )


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def test_all_matches_public_names() -> None:
    assert len(tk.__all__) == len(set(tk.__all__)), "tk.__all__ lists a name twice"
    public = {
        name
        for name, value in vars(tk).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert {name for name in tk.__all__ if not _is_dunder(name)} == public


def test_every_public_name_resolves() -> None:
    for name in tk.__all__:
        assert hasattr(tk, name), f"tk.__all__ lists {name!r}, which torchkit does not define"


def test_version_matches_installed_metadata() -> None:
    assert tk.__version__ == importlib.metadata.version("torchkit")


def _documented_names() -> set[str]:
    names: set[str] = set()
    for page in (ROOT / "docs" / "api").glob("*.rst"):
        text = page.read_text()
        names.update(
            re.findall(r"^\.\. auto(?:class|function|data|exception)::\s+([\w.]+)", text, re.M)
        )
        for block in re.findall(
            r"^\.\. autosummary::\n((?:[ \t]*:.*\n)*(?:\n|[ \t]+.*\n)*)", text, re.M
        ):
            names.update(
                line.strip()
                for line in block.splitlines()
                if line.strip() and not line.strip().startswith(":")
            )
    return {name.removeprefix("torchkit.") for name in names}


def test_every_public_name_is_documented() -> None:
    undocumented = {name for name in tk.__all__ if not _is_dunder(name)} - _documented_names()
    assert not undocumented, f"add these to a docs/api/*.rst page: {sorted(undocumented)}"


def test_py_typed_ships() -> None:
    assert importlib.resources.files("torchkit").joinpath("py.typed").is_file()
