"""The README's contributor commands are the two CI runs.

Its python blocks, and every docs page's, are run by tests/test_docs_blocks.py.
"""

from __future__ import annotations

from pathlib import Path

from tests.test_docs_blocks import (  # rst_python_blocks: tests of single guides use it
    fenced_blocks,
    markdown_section,
    rst_python_blocks,
)

__all__ = ["rst_python_blocks"]

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONTRIBUTOR_COMMANDS = ['pip install -c constraints.txt -e ".[dev]"', "pytest"]


def test_contributing_has_exactly_the_two_setup_commands() -> None:
    blocks = fenced_blocks(markdown_section(README.read_text(), "Contributing"), "bash")
    assert len(blocks) == 1
    assert blocks[0].strip().splitlines() == CONTRIBUTOR_COMMANDS


def test_try_it_is_the_contributor_install_then_the_quickstart_then_the_tests() -> None:
    (block,) = fenced_blocks(markdown_section(README.read_text(), "Try it"), "bash")
    install, test = block.strip().splitlines()
    assert install == f"{CONTRIBUTOR_COMMANDS[0]} && python examples/quickstart.py"
    assert test == CONTRIBUTOR_COMMANDS[1]


def test_ci_runs_the_contributor_commands() -> None:
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in CONTRIBUTOR_COMMANDS:
        assert command in ci_lines, f".ci/run does not run {command!r} as its own line"
