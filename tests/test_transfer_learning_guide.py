"""docs/guide/transfer_learning.rst runs as one script on a real ImageFolder; its numbers hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from tests.test_readme import rst_python_blocks

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide" / "transfer_learning.rst"


def test_transfer_learning_guide_runs_and_learns(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = rst_python_blocks(GUIDE.read_text())
    assert len(blocks) >= 11, "the guide lost code blocks"
    namespace = {"__name__": "__guide__"}
    for number, block in enumerate(blocks):
        exec(compile(block, f"{GUIDE}:block{number}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "['0', '1', '2']" in out
    assert "fc Linear(in_features=512, out_features=1000, bias=True)" in out
    assert "training 1,539 of 11,178,051 parameters" in out
    assert "['layer1', 'layer2', 'layer3', 'layer4']" in out
    # The data is PNG files on disk, read through torchvision's ImageFolder.
    train_set, valid_set = namespace["train_loader"].dataset, namespace["valid_loader"].dataset
    assert isinstance(train_set, ImageFolder) and isinstance(valid_set, ImageFolder)
    assert (len(train_set), len(valid_set)) == (60, 45)
    assert all(Path(path).suffix == ".png" for path, _ in train_set.samples)
    model, restored, opt = namespace["model"], namespace["restored"], namespace["opt"]
    assert [group["lr"] for group in opt.param_groups] == [1e-2, 1e-3]
    assert namespace["accuracy"](model) > 0.6  # three classes: chance is 1/3
    images = namespace["val_images"]
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(images), model.eval()(images), rtol=0, atol=0)
    # predict_image: the top-2 classes by probability, for the first validation file.
    top = namespace["top"]
    assert [name for name, _ in top] == [namespace["classes"][i] for i in
                                         restored(images[:1]).softmax(1)[0].argsort(
                                             descending=True)[:2].tolist()]
    assert top[0][1] >= top[1][1] and sum(p for _, p in top) <= 1 + 1e-6
    picture = namespace["root"] / "predictions.png"
    assert picture.stat().st_size > 0
    with Image.open(picture) as image:
        assert image.format == "PNG"
