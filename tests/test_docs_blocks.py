"""The docs say what runs: every python block of the README and of the docs' pages runs,
every install line agrees, and every extra is documented and in ``all``."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli before Python 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
GUIDES = sorted((DOCS / "guide").glob("*.rst"))
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def markdown_section(text: str, heading: str) -> str:
    """Return the body of the ``## heading`` section of a markdown document."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def fenced_blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```\s*$", markdown, re.M | re.S)


def rst_blocks(text: str, language: str = "python") -> list[str]:
    """Return the bodies of the ``.. code-block:: <language>`` directives of an rst text."""
    blocks = []
    for match in re.finditer(
        rf"^\.\. code-block:: {language}\n((?:[ \t]*:.*\n)*)((?:\n|[ \t]+.*\n)+)", text, re.M
    ):
        lines = match.group(2).splitlines()
        indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        blocks.append("\n".join(line[indent:] for line in lines) + "\n")
    return blocks


def rst_python_blocks(text: str) -> list[str]:
    return rst_blocks(text, "python")


PAGES = [page for page in sorted(DOCS.glob("*.rst")) if rst_python_blocks(page.read_text())]


def run_blocks(blocks: list[str], where: str, namespace: dict[str, object]) -> None:
    for number, block in enumerate(blocks):
        exec(compile(block, f"{where}:block{number}", "exec"), namespace)


def test_readme_python_blocks_run(capsys: pytest.CaptureFixture[str]) -> None:
    """Every ```python block of the README runs, each as its own script, as pasted."""
    blocks = fenced_blocks(README.read_text(), "python")
    assert len(blocks) >= 2, "the README lost its python blocks"
    for number, block in enumerate(blocks):
        run_blocks([block], f"{README}:{number}", {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert "best val_loss" in out  # the pieces in a hand-written loop
    assert "val_acc" in out  # the Trainer


@pytest.mark.parametrize("page", GUIDES + PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_page_code_runs(page: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each page's python blocks run, in order, as one script, and print something."""
    blocks = rst_python_blocks(page.read_text())
    if page in GUIDES:
        assert len(blocks) >= 3, f"{page} lost its code blocks"
    assert blocks
    run_blocks(blocks, str(page), {"__name__": "__guide__"})
    assert capsys.readouterr().out


def test_index_snippet_counts_its_optimizer_steps(capsys: pytest.CaptureFixture[str]) -> None:
    (block,) = rst_python_blocks((DOCS / "index.rst").read_text())
    run_blocks([block], "index.rst", {})
    assert capsys.readouterr().out == "2 optimizer steps\n"


# --- install lines ----------------------------------------------------------------------

CLONE_INSTALL = re.compile(r'pip install -e (\.|"\.\[[a-z,]+\]")( [a-z][a-z0-9-]*)*')
PUBLISHED = re.compile(r'pip install (torchkit|"torchkit\[[a-z,]+\]")')


def install_commands(text: str) -> list[str]:
    """Each ``pip install ...`` command in ``text``, up to a comment, quote or backtick."""
    return [m.group(0).strip() for m in re.finditer(r"pip install[^#`\n]*", text)]


def test_examples_install_from_a_clone_as_the_readme_says() -> None:
    for script in EXAMPLES:
        docstring = script.read_text().split('"""')[1]
        commands = install_commands(docstring)
        assert len(commands) == 1, f"{script.name} should say how to install what it needs"
        assert CLONE_INSTALL.fullmatch(commands[0]), (script.name, commands[0])
        if "from sklearn" in script.read_text():
            assert "scikit-learn" in commands[0], script.name


def test_install_lines_agree() -> None:
    """Commands install from a clone; the published form appears only where the
    placeholder on PyPI is explained, never as a command to run today."""
    readme = README.read_text()
    installation = (DOCS / "installation.rst").read_text()
    for name, text in [("README.md", readme), ("installation.rst", installation),
                       ("getting_started.rst", (DOCS / "getting_started.rst").read_text()),
                       ("api/loggers.rst", (DOCS / "api" / "loggers.rst").read_text())]:
        for command in install_commands(text):
            if PUBLISHED.match(command):
                assert name in ("README.md", "installation.rst"), (name, command)
            elif not command.startswith(("pip install -c constraints.txt", "pip install torch==",
                                         "pip install dist/")):
                assert CLONE_INSTALL.fullmatch(command), (name, command)
    for text in (markdown_section(readme, "Install"), installation):
        assert "unrelated" in text and "placeholder" in text
        assert "does **not** install this project" in text
    assert "download.pytorch.org/whl/cpu" in markdown_section(readme, "Try it")


def extras() -> dict[str, list[str]]:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["project"]["optional-dependencies"]


def test_every_extra_is_in_all_and_documented() -> None:
    found = extras()
    features = sorted(set(found) - {"all", "dev", "docs"})  # docs, dev: not features
    (everything,) = found["all"]
    assert sorted(re.fullmatch(r"torchkit\[(.*)\]", everything).group(1).split(",")) == features
    readme_table = markdown_section(README.read_text(), "Install")
    installation = (DOCS / "installation.rst").read_text()
    dev = set(found["dev"])
    for extra in [*features, "all"]:
        assert f"| `{extra}` |" in readme_table, f"README's extras table lacks {extra}"
        assert f"   * - ``{extra}``" in installation, f"installation.rst lacks {extra}"
        if extra != "all":
            assert set(found[extra]) <= dev, f"the dev extra lacks {extra}'s requirements"


def test_quickstart_claims_agree() -> None:
    """The README, the getting-started page and the script state the same measured result."""
    docstring = (ROOT / "examples" / "quickstart.py").read_text().split('"""')[1]
    claim = re.search(r"# (~\d+ % val accuracy in about \d+ s on \d CPU cores)", docstring)
    assert claim, "examples/quickstart.py no longer states its result"
    accuracy, seconds, cores = re.findall(r"\d+", claim.group(1))
    for text in (README.read_text(), (DOCS / "getting_started.rst").read_text()):
        flat = " ".join(text.split())
        assert f"~{accuracy} %" in flat and f"{seconds} s" in flat and f"{cores} CPU cores" in flat
