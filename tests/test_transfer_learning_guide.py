"""docs/guide/transfer_learning.rst runs as one script, and its numbers hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_readme import rst_python_blocks

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide" / "transfer_learning.rst"


def test_transfer_learning_guide_runs_and_learns(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = rst_python_blocks(GUIDE.read_text())
    assert len(blocks) >= 8, "the guide lost code blocks"
    namespace = {"__name__": "__guide__"}
    for number, block in enumerate(blocks):
        exec(compile(block, f"{GUIDE}:block{number}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "fc Linear(in_features=512, out_features=1000, bias=True)" in out
    assert "training 1,539 of 11,178,051 parameters" in out
    assert "['layer1', 'layer2', 'layer3', 'layer4']" in out
    model, restored, opt = namespace["model"], namespace["restored"], namespace["opt"]
    assert [group["lr"] for group in opt.param_groups] == [1e-2, 1e-3]
    assert namespace["accuracy"](model) > 0.6  # three classes: chance is 1/3
    images = namespace["val_images"]
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(images), model.eval()(images), rtol=0, atol=0)
