"""CI's configuration files parse, and say what .ci/run and the README say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_docs_blocks import fenced_blocks, markdown_section

ROOT = Path(__file__).resolve().parent.parent
CI_RUN = (ROOT / ".ci" / "run").read_text()
YAML_FILES = [".github/workflows/ci.yml", ".github/workflows/release.yml",
              ".readthedocs.yaml", ".pre-commit-config.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def runs(job: dict) -> list[str]:
    """The shell lines a workflow job runs, one command a line."""
    return [line.strip() for step in job["steps"] if "run" in step
            for line in step["run"].splitlines() if line.strip()]


def ci_run_commands() -> list[str]:
    return [line.strip() for line in CI_RUN.splitlines()
            if line.strip() and not line.lstrip().startswith(("#", "stage "))]


@pytest.mark.parametrize("name", YAML_FILES)
def test_yaml_files_parse(name: str) -> None:
    assert isinstance(load(name), dict)


def test_the_workflow_tests_with_the_readme_commands() -> None:
    install, test = fenced_blocks(markdown_section((ROOT / "README.md").read_text(),
                                                   "Contributing"), "bash")[0].split("\n")[:2]
    jobs = load(".github/workflows/ci.yml")["jobs"]
    assert runs(jobs["test"]) == [install, test]
    assert jobs["test"]["strategy"]["matrix"]["python"] == ["3.10", "3.11", "3.12", "3.13"]
    assert {install, test} <= set(ci_run_commands())


def torch_version_stages() -> list[tuple[str, str]]:
    """The (torch, torchvision) of each `bash .ci/torch-version` stage that .ci/run runs."""
    return [(match[1], match[2] or "") for line in ci_run_commands()
            if (match := re.fullmatch(r"bash \.ci/torch-version (\S+)(?: (\S+))?", line))]


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_ci_run_tests_the_oldest_and_the_newest_torch_and_the_workflow_too() -> None:
    stages = torch_version_stages()
    assert stages == [("2.8.0", "0.23.0"), ("2.15.0", "")]
    # the oldest is pyproject.toml's floor, the newest is newer than constraints.txt's pin
    floor = re.search(r'"torch>=([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    oldest, newest = stages[0][0], stages[-1][0]
    assert version(oldest)[:len(version(floor))] == version(floor)
    pinned = re.search(r"^torch==([\d.]+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert version(newest) > version(pinned.group(1))
    # .ci/run installs uv for them before the first one
    commands = ci_run_commands()
    assert commands.index('pip install "uv>=0.4"') < commands.index(
        f"bash .ci/torch-version {oldest} {stages[0][1]}")
    job = load(".github/workflows/ci.yml")["jobs"]["torch-versions"]
    in_workflow = {(entry["torch"], entry["torchvision"])
                   for entry in job["strategy"]["matrix"]["include"]}
    assert in_workflow == set(stages)
    assert runs(job) == ['pip install "uv>=0.4"',
                         "bash .ci/torch-version ${{ matrix.torch }} ${{ matrix.torchvision }}"]


def core_leave_out() -> dict[str, str]:
    """.ci/torch-version's CORE_LEAVE_OUT: {test id prefix: reason}."""
    text = (ROOT / ".ci" / "torch-version").read_text()
    block = re.search(r"^CORE_LEAVE_OUT=\(\n(.*?)^\)", text, re.M | re.S).group(1)
    entries = [re.fullmatch(r'\s*"([^"=]+)=([^"]+)"', line) for line in block.splitlines()]
    assert all(entries), block
    return {entry[1]: entry[2] for entry in entries if entry}


def test_the_core_suite_keeps_every_test_of_torch_version_dependent_code() -> None:
    """What the version stages leave out names real tests, says why, and spares the tests
    of what depends on torch's version."""
    left_out = core_leave_out()
    assert left_out
    for prefix, reason in left_out.items():
        path = prefix.split("::", 1)[0]
        assert (ROOT / path).is_file(), prefix
        assert len(reason) > 20, prefix
        if "::" in prefix:
            name = prefix.split("::", 1)[1]
            test, _, case = name.partition("[")
            source = (ROOT / path).read_text()
            assert f"def {test}" in source, prefix  # a test name, or its start
            if case:
                assert f'"{case.rstrip("]")}"' in source or case.rstrip("]").isdigit(), prefix
    whole_files = {prefix for prefix in left_out if "::" not in prefix}
    kept = ["tests/test_checkpoint.py", "tests/test_checkpoint_trust.py",
            "tests/test_checkpoint_manager.py", "tests/test_sharded.py",
            "tests/test_accumulation.py", "tests/test_trainer.py", "tests/test_trainer_ddp.py",
            "tests/test_trainer_resume.py", "tests/test_trainer_compile.py",
            "tests/test_distributed.py", "tests/test_quantization.py",
            "tests/test_averaging.py", "tests/test_surgery.py", "tests/test_state.py"]
    for name in kept:
        assert (ROOT / name).is_file(), name
        assert name not in whole_files, name
    assert not any(prefix.startswith("src/") for prefix in left_out)  # docstring examples
    # torchkit under torchrun stays in when the two-agent torchrun tests are left out
    assert not any("test_under_torchrun" in prefix or prefix == "tests/test_distributed.py"
                   for prefix in left_out)


def test_the_workflow_checks_are_those_of_ci_run() -> None:
    checks = runs(load(".github/workflows/ci.yml")["jobs"]["checks"])
    commands = ci_run_commands()
    for command in ("ruff check .", "mypy --strict src/",
                    "sphinx-build -W --keep-going -b html docs docs/_build/html"):
        assert command in checks and command in commands, command
    assert "twine check --strict dist/*" in checks
    assert any(line.endswith("/.ci/smoke_wheel.py\"") for line in checks)
    assert any(line.endswith('"$ROOT/.ci/smoke_wheel.py"') for line in commands)


def test_release_builds_checks_and_publishes_on_a_tag_through_trusted_publishing() -> None:
    release = load(".github/workflows/release.yml")
    assert release[True]["push"]["tags"] == ["v*"]  # YAML 1.1 reads the key "on" as True
    build, publish = release["jobs"]["build"], release["jobs"]["publish"]
    assert "python -m build --outdir dist ." in runs(build)
    assert "twine check --strict dist/*" in runs(build)
    assert publish["needs"] == "build"
    assert publish["permissions"] == {"id-token": "write"}
    (upload,) = [s for s in publish["steps"] if s.get("uses", "").startswith("pypa/")]
    assert upload["uses"] == "pypa/gh-action-pypi-publish@release/v1"
    assert "with" not in upload  # no password or token: trusted publishing


def test_read_the_docs_builds_the_sphinx_docs_with_warnings_as_errors() -> None:
    config = load(".readthedocs.yaml")
    assert config["version"] == 2
    assert config["sphinx"] == {"configuration": "docs/conf.py", "fail_on_warning": True}
    (install,) = config["python"]["install"]
    assert install == {"method": "pip", "path": ".", "extra_requirements": ["docs"]}


def test_pre_commit_runs_the_ruff_and_mypy_of_ci() -> None:
    (repo,) = load(".pre-commit-config.yaml")["repos"]
    entries = {hook["id"]: hook["entry"] for hook in repo["hooks"]}
    assert entries == {"ruff": "ruff check", "mypy": "mypy --strict src/"}
    assert "ruff check ." in ci_run_commands() and "mypy --strict src/" in ci_run_commands()


def test_core_suite_plugin_deselects_and_lists_what_needs_a_missing_package(tmp_path) -> None:
    """.ci/core_suite.py: what needs the package is left out (not skipped) and listed."""
    (tmp_path / "test_top.py").write_text("import fakepkg\n\ndef test_a():\n    pass\n")
    (tmp_path / "page.rst").write_text(".. code-block:: python\n\n   import fakepkg\n")
    (tmp_path / "test_mixed.py").write_text(
        "from pathlib import Path\n\nimport pytest\n\n"
        "PAGE = Path(__file__).parent / 'page.rst'\n\n"
        "def helper():\n    import fakepkg\n\n"
        "def test_direct():\n    import fakepkg.sub\n\n"
        "def test_through_a_helper():\n    helper()\n\n"
        "def test_reads_a_page():\n    PAGE.read_text()\n\n"
        "def test_word():\n    assert 'use pt9e' \n\n"
        "@pytest.mark.parametrize('path', [PAGE])\n"
        "def test_param(path):\n    pass\n\n"
        "def test_free():\n    assert 1 + 1 == 2\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "core_suite", "-p", "no:cacheprovider",
         "--without", "fakepkg,pt9e=not here", "-o", "addopts=", "--rootdir", str(tmp_path),
         str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT / ".ci")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "1 passed, 5 deselected" in out
    assert "fakepkg (not here): 6 left out" in out
    assert "test_top.py (the whole file)" in out
    for name in ("test_direct", "test_through_a_helper", "test_reads_a_page", "test_word",
                 "test_param[path0]"):
        assert f"test_mixed.py::{name}" in out, name
    assert "test_free" not in out.split("left out")[-1]


def test_core_suite_plugin_leaves_out_by_id_and_refuses_a_stale_entry(tmp_path) -> None:
    """--leave-out deselects a file or a test by id, lists each with the reason, and a
    prefix that matches nothing (a renamed file or test) is an error, not a no-op."""
    (tmp_path / "test_a.py").write_text(
        "import pytest\n\n"
        "def test_one():\n    pass\n\n"
        "@pytest.mark.parametrize('n', [1, 2])\n"
        "def test_two(n):\n    pass\n\n"
        "def test_twofold():\n    pass\n")
    (tmp_path / "test_b.py").write_text("def test_b():\n    pass\n")

    def run(*leave_out: str) -> subprocess.CompletedProcess[str]:
        options = [arg for entry in leave_out for arg in ("--leave-out", entry)]
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "core_suite", "-p", "no:cacheprovider",
             *options, "-o", "addopts=", "--rootdir", str(tmp_path), str(tmp_path)],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT / ".ci")})

    result = run("test_b.py=slow here", "test_a.py::test_two[=two is enough")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "2 passed, 3 deselected" in out  # test_one and test_twofold ran
    assert "test_b.py (slow here): 1 left out" in out
    assert "test_a.py::test_two[ (two is enough): 2 left out" in out
    for name in ("test_b.py::test_b", "test_a.py::test_two[1]", "test_a.py::test_two[2]"):
        assert f"    {name}" in out, name
    for stale in ("test_c.py=renamed", "test_a.py::test_three=renamed"):
        result = run("test_b.py=slow here", stale)
        assert result.returncode == 4, result.stdout + result.stderr  # a usage error
        assert f"--leave-out matches no test: {stale.split('=')[0]}" in result.stderr
