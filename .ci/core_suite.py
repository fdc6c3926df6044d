"""pytest plugin for CI's torch-version stages: deselect, and say so, what needs a missing package.

Loaded as ``PYTHONPATH=.ci pytest -p core_suite --without "torchvision=REASON" ...``;
``--without "torchao,pt2e=REASON"`` also counts code that contains ``pt2e`` (torchkit's
torchao backend) as needing torchao. A test needs a package when its file imports it at the top
(the whole file is then left out of collection), or when the source of the test, of its
fixtures, of the module-level helpers it calls (transitively), of its docstring
(doctests) or of a file it reads (a parameter, or a module-level path it uses: an example
script, a guide page) imports or names the package or one of its words.
``--leave-out "PATH[::NAME]=REASON"`` (repeatable) also leaves out every test whose id is
PATH (a test file or folder) or starts with ``PATH::NAME``; one whose PATH does not exist,
or that matches no test of a file that was collected, is an error (a renamed file or test
must not silently stay in the list).
Deselected tests are not skipped: they are left out, and listed with the reason at the
end of the run, so that "N passed" counts only what ran.
"""

from __future__ import annotations

import ast
import inspect
import re
import types
from pathlib import Path
from typing import Any

import pytest

_LEFT_OUT: dict[str, list[str]] = {}  # package -> test ids or files left out
_LEFT_OUT_BY_ID: dict[str, list[str]] = {}  # --leave-out prefix -> test ids left out


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--without PACKAGE[,WORD...]=REASON`` and ``--leave-out PATH=REASON``."""
    parser.addoption(
        "--without", action="append", default=[], metavar="PACKAGE=REASON",
        help="leave out (deselect) every test that needs PACKAGE, printing REASON",
    )
    parser.addoption(
        "--leave-out", action="append", default=[], metavar="PATH[::NAME]=REASON",
        help="leave out (deselect) the tests of PATH (or those starting PATH::NAME), "
             "printing REASON",
    )


def _leave_out(config: pytest.Config) -> dict[str, str]:
    """``{test id prefix: reason}`` from the ``--leave-out`` options."""
    prefixes = {}
    for option in config.getoption("leave_out"):
        prefix, _, reason = option.partition("=")
        prefixes[prefix.strip().rstrip("/")] = reason.strip() or "left out"
    return prefixes


def _matches(nodeid: str, prefix: str) -> bool:
    path = nodeid.split("::", 1)[0]
    if "::" in prefix:
        return nodeid.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


def _without(config: pytest.Config) -> dict[str, tuple[str, list[str]]]:
    """``{package: (reason, extra words)}`` from the ``--without`` options."""
    packages = {}
    for option in config.getoption("without"):
        names, _, reason = option.partition("=")
        package, *words = [name.strip() for name in names.split(",")]
        packages[package] = (reason.strip() or "not installed", words)
    return packages


def _pattern(package: str, words: list[str]) -> re.Pattern[str]:
    name = re.escape(package)
    alternatives = [rf"\bimport {name}\b", rf"\bfrom {name}\b", rf"\b{name}\.\w",
                    rf"[\"']{name}[\"']", *(re.escape(word) for word in words)]
    return re.compile("|".join(alternatives))


def _top_level_imports(path: Path) -> set[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return set()
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Leave out a file that imports a missing package at its top."""
    if collection_path.suffix != ".py" or not collection_path.is_file():
        return None
    missing = set(_without(config)) & _top_level_imports(collection_path)
    if not missing:
        return None
    for package in sorted(missing):
        _LEFT_OUT.setdefault(package, []).append(f"{collection_path} (the whole file)")
    return True


def _sources(item: pytest.Item) -> list[str]:
    """The source texts a test depends on, as far as can be seen statically."""
    texts: list[str] = []
    if isinstance(item, pytest.DoctestItem):
        examples = item.dtest.examples if item.dtest is not None else []
        return ["".join(example.source for example in examples)]
    function = getattr(item, "function", None)
    module = getattr(item, "module", None)
    seen: set[Any] = set()
    todo = [function] if function is not None else []
    fixture_defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    for defs in fixture_defs.values():
        todo.extend(d.func for d in defs)
    while todo:
        obj = todo.pop()
        if obj in seen or not callable(obj):
            continue
        seen.add(obj)
        try:
            texts.append(inspect.getsource(obj))
        except (OSError, TypeError):
            continue
        code = getattr(obj, "__code__", None)
        if module is not None and isinstance(code, types.CodeType):
            for name in _names(code):
                value = getattr(module, name, None)
                if isinstance(value, (types.FunctionType, type)):
                    todo.append(value)
                if isinstance(value, Path) and value.is_file():
                    texts.append(_code(value))
    callspec = getattr(item, "callspec", None)
    for value in (callspec.params.values() if callspec is not None else ()):
        if isinstance(value, Path) and value.is_file():
            texts.append(_code(value))
    return texts


def _code(path: Path) -> str:
    """The code in a file: all of a script, the code blocks of an rst or markdown page."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".rst":
        blocks = re.findall(r"^\.\. code-block:: \w+\n((?:\n|[ \t]+.*\n)+)", text, re.M)
        return "\n".join(blocks)
    if path.suffix == ".md":
        return "\n".join(re.findall(r"^```\w*\n(.*?)^```", text, re.M | re.S))
    return text


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the tests left out by id, and those whose sources need a missing package."""
    packages = _without(config)
    prefixes = _leave_out(config)
    if not packages and not prefixes:
        return
    patterns = {package: _pattern(package, words) for package, (_, words) in packages.items()}
    kept, dropped = [], []
    for item in items:
        by_id = [prefix for prefix in prefixes if _matches(item.nodeid, prefix)]
        if by_id:
            dropped.append(item)
            _LEFT_OUT_BY_ID.setdefault(by_id[0], []).append(item.nodeid)
            continue
        texts = _sources(item)
        needs = [p for p, pattern in patterns.items() if any(pattern.search(t) for t in texts)]
        if needs:
            dropped.append(item)
            for package in needs:
                _LEFT_OUT.setdefault(package, []).append(item.nodeid)
        else:
            kept.append(item)
    collected = {item.nodeid.split("::", 1)[0] for item in [*kept, *dropped]}
    stale = [prefix for prefix in prefixes if prefix not in _LEFT_OUT_BY_ID and (
        not (config.rootpath / prefix.split("::", 1)[0]).exists()
        or prefix.split("::", 1)[0] in collected)]
    if stale:
        raise pytest.UsageError(f"--leave-out matches no test: {', '.join(stale)}")
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """List what was left out, with the reason: by id, then package by package."""
    packages = _without(config)
    prefixes = _leave_out(config)
    write = terminalreporter.write_line
    if prefixes:
        terminalreporter.section("left out of this core suite (the main stage runs them)")
        for prefix, reason in prefixes.items():
            left_out = _LEFT_OUT_BY_ID.get(prefix, [])
            count = f"{len(left_out)} left out" if left_out else "not collected in this run"
            write(f"{prefix} ({reason}): {count}")
            for name in left_out:
                write(f"    {name}")
    if packages:
        terminalreporter.section("left out: tests that need a package this run does not have")
    for package, (reason, _) in packages.items():
        left_out = _LEFT_OUT.get(package, [])
        write(f"{package} ({reason}): {len(left_out)} left out")
        for name in left_out:
            write(f"    {name}")
