"""The README's quickstart and contributor commands, and every how-to page's code, really run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GUIDES = sorted((ROOT / "docs" / "guide").glob("*.rst"))
CONTRIBUTOR_COMMANDS = ['pip install -c constraints.txt -e ".[dev]"', "pytest"]


def markdown_section(text: str, heading: str) -> str:
    """Return the body of the ``## heading`` section of a markdown document."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def fenced_blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```\s*$", markdown, re.M | re.S)


def rst_python_blocks(text: str) -> list[str]:
    """Return the bodies of the ``.. code-block:: python`` directives of an rst document."""
    blocks = []
    for match in re.finditer(
        r"^\.\. code-block:: python\n((?:[ \t]*:.*\n)*)((?:\n|[ \t]+.*\n)+)", text, re.M
    ):
        lines = match.group(2).splitlines()
        indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        blocks.append("\n".join(line[indent:] for line in lines) + "\n")
    return blocks


def test_quickstart_runs(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = fenced_blocks(markdown_section(README.read_text(), "Quickstart"), "python")
    assert blocks, "the Quickstart section has no ```python block"
    for number, block in enumerate(blocks):
        exec(compile(block, f"{README}:Quickstart{number}", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert "best val_loss" in out
    assert len(blocks) < 2 or "val_acc" in out


def test_contributing_has_exactly_the_two_setup_commands() -> None:
    blocks = fenced_blocks(markdown_section(README.read_text(), "Contributing"), "bash")
    assert len(blocks) == 1
    assert blocks[0].strip().splitlines() == CONTRIBUTOR_COMMANDS


def test_ci_runs_the_contributor_commands() -> None:
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in CONTRIBUTOR_COMMANDS:
        assert command in ci_lines, f".ci/run does not run {command!r} as its own line"


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_guide_code_runs(guide: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each how-to page's code blocks run, in order, as one script."""
    blocks = rst_python_blocks(guide.read_text())
    assert len(blocks) >= 3, f"{guide} lost its code blocks"
    namespace = {"__name__": "__guide__"}
    for number, block in enumerate(blocks):
        exec(compile(block, f"{guide}:block{number}", "exec"), namespace)
    assert capsys.readouterr().out
