"""capture, feature_grid, grad_cam and misclassified: hooks that leave nothing behind, maps
that point at the evidence, mistakes in data order."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchkit as tk
import torchkit._names
import torchkit.inspection._capture
import torchkit.surgery._editing
import torchkit.surgery._freezing


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layer2(self.layer1(self.stem(x)))).flatten(1))


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def global_hooks() -> int:
    module = torch.nn.modules.module
    return sum(len(getattr(module, name)) for name in dir(module)
               if name.startswith("_global_") and name.endswith("_hooks"))


# --- capture --------------------------------------------------------------------------


def test_capture_uses_the_glob_matcher_of_freeze():
    # One matcher for qualified names, imported by every piece that selects by name.
    for module in (torchkit.inspection._capture, torchkit.surgery._freezing,
                   torchkit.surgery._editing):
        assert module.matches is torchkit._names.matches
        assert module.unmatched is torchkit._names.unmatched
    model = Net()
    frozen = tk.freeze(model, "layer*")
    assert {name.split(".")[0] for name in frozen} == {"layer1", "layer2"}
    with tk.capture(model, "layer*") as outs:  # the same pattern: the same modules
        model(torch.randn(2, 1, 6, 6))
    assert list(outs) == ["layer1", "layer2"]  # outermost matches only
    with tk.capture(model, ["*.0", "stem"]) as outs:  # "*" matches dots, as in freeze
        model(torch.randn(2, 1, 6, 6))
    assert list(outs) == ["stem", "layer1.0", "layer2.0"]
    with pytest.raises(ValueError, match=r"'layer3' matched no submodule of Net; did you "
                                         r"mean layer2, layer1"):
        enter(model, ["layer1", "layer3"])
    with pytest.raises(ValueError, match=r"'layr1\.\*' matched no parameter.*did you mean"):
        tk.freeze(model, "layr1.*")


def test_capture_records_outputs_as_copies_on_the_requested_device():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True))
    x = torch.randn(5, 3)
    with tk.capture(model, ["0", "1"]) as outs:
        y = model(x)
    expected = F.linear(x, model[0].weight, model[0].bias)
    torch.testing.assert_close(outs["0"], expected)  # not changed by the in-place ReLU
    assert (outs["0"] < 0).any()
    torch.testing.assert_close(outs["1"], y)
    assert not outs["0"].requires_grad and outs["0"].device.type == "cpu"
    assert outs.grads == {}
    with tk.capture(model, "0", to=None) as outs:
        model(x)
        model(2 * x)  # the latest call wins
    torch.testing.assert_close(outs["0"], F.linear(2 * x, model[0].weight, model[0].bias))


def test_capture_tuple_outputs():
    lstm = nn.Sequential()
    lstm.add_module("rnn", nn.LSTM(3, 4, batch_first=True))
    with tk.capture(lstm, "rnn") as outs:
        out, (h, c) = lstm(torch.randn(2, 5, 3))
    captured_out, (captured_h, captured_c) = outs["rnn"]
    torch.testing.assert_close(captured_out, out.detach())
    torch.testing.assert_close((captured_h, captured_c), (h.detach(), c.detach()))


def test_capture_keeps_gradients_of_outputs_after_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(6, 3)
    with tk.capture(model, ["0", "1"], grads=True) as outs:
        out = model(x)
        assert outs.grads == {}  # nothing before backward
        (out ** 2).sum().backward()
    hidden = torch.tanh(F.linear(x, model[0].weight, model[0].bias))
    grad_hidden = 2 * out.detach() @ model[2].weight.detach()  # d loss / d tanh output
    torch.testing.assert_close(outs.grads["1"], grad_hidden)
    torch.testing.assert_close(outs.grads["0"], grad_hidden * (1 - hidden.detach() ** 2))
    assert set(outs.grads) == {"0", "1"}


def test_capture_detach_false_keeps_the_graph():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with tk.capture(model, "1", detach=False, to=None) as outs:
        score = model(torch.randn(2, 3))[:, 0].sum()
    (grad,) = torch.autograd.grad(score, outs["1"])
    torch.testing.assert_close(grad, model[2].weight[0].detach().expand(2, 4))


def test_capture_removes_every_hook_on_exit_also_on_an_exception():
    model = Net()
    x = torch.randn(2, 1, 6, 6)
    with tk.capture(model, ["layer1", "fc"], grads=True) as outs:
        assert hooks(model) == 2
        model(x).sum().backward()
    assert hooks(model) == 0
    with pytest.raises(KeyError, match="boom"), tk.capture(model, "*", grads=True) as outs:
        assert hooks(model) == 5
        out = model(x)
        raise KeyError("boom")
    assert hooks(model) == 0
    # The gradient hooks on the outputs are gone too: a later backward records nothing.
    out.sum().backward()
    assert outs.grads == {}
    model(x)  # nor does a later forward
    assert set(outs) == {"stem", "layer1", "layer2", "pool", "fc"}


def test_capture_costs_nothing_when_not_used():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 1, 6, 6)
    expected = model(x)
    before = global_hooks()
    with tk.capture(model, "*"):
        model(x)
    # Nothing is left on the model or registered globally; the forward is the same.
    assert hooks(model) == 0 and global_hooks() == before == 0
    assert model.__dict__.keys() == Net().__dict__.keys()
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def enter(*args, **kwargs) -> None:
    with tk.capture(*args, **kwargs):
        pass


def test_capture_errors():
    model = Net()
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        enter("net", "fc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"names must be a pattern or a non-empty list"):
        enter(model, [])
    with pytest.raises(TypeError, match="names must be a glob pattern"):
        enter(model, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="to must be a device"):
        enter(model, "fc", to="gpu0")
    with pytest.raises(TypeError, match="grads and detach must be bools"):
        enter(model, "fc", grads=1)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"output of 'fc' does not require grad"), \
            tk.capture(model, "fc", grads=True), torch.no_grad():
        model(torch.randn(1, 1, 4, 4))
    lstm = nn.Sequential(nn.LSTM(3, 4))
    with pytest.raises(TypeError, match=r"needs tensor outputs, but '0' returned a tuple"), \
            tk.capture(lstm, "0", grads=True):
        lstm(torch.randn(5, 1, 3))
    assert hooks(model) == 0 and hooks(lstm) == 0


# --- feature_grid ---------------------------------------------------------------------


def test_feature_grid_tiles_normalised_channels():
    features = torch.randn(2, 5, 3, 4)
    features[1, 4] = 7.0  # a constant channel shows as 0
    grid = tk.feature_grid(features, ncols=2, padding=1)
    assert grid.shape == (2, 1, 3 * 3 + 2, 2 * 4 + 1)
    for i in range(5):
        r, c = divmod(i, 2)
        tile = grid[:, 0, r * 4:r * 4 + 3, c * 5:c * 5 + 4]
        channel = features[:, i]
        low = channel.amin(dim=(1, 2), keepdim=True)
        span = channel.amax(dim=(1, 2), keepdim=True) - low
        expected = torch.where(span > 0, (channel - low) / span, 0.0)
        torch.testing.assert_close(tile, expected)
    assert (grid[:, :, 3, :] == 1).all()  # white padding between rows
    assert (grid[:, :, 8:, 5:] == 1).all()  # the empty sixth tile
    assert tk.feature_grid(torch.randn(1, 100, 2, 2)).shape == (1, 1, 8 * 3 - 1, 8 * 3 - 1)
    assert tk.feature_grid(torch.randn(1, 100, 2, 2), max_channels=None).shape[-1] == 29


def test_feature_grid_errors():
    with pytest.raises(TypeError, match="features must be a floating-point tensor, got "
                                        "torch.int64"):
        tk.feature_grid(torch.zeros(1, 2, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\), got \(2, 3, 3\); ncols must "
                                         r"be an int >= 1, got 0; padding must be an int >= 0"):
        tk.feature_grid(torch.zeros(2, 3, 3), ncols=0, padding=-1)
    with pytest.raises(ValueError, match="max_channels must be an int >= 1, got 0"):
        tk.feature_grid(torch.zeros(1, 2, 3, 3), max_channels=0)


# --- grad_cam -------------------------------------------------------------------------


def patch_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
    """Class 1: a bright 4x4 patch at a random place in 16x16 noise; class 2: a dark one;
    class 0: neither."""
    images = 0.3 * torch.randn(n, 1, 16, 16, generator=generator)
    labels = torch.randint(0, 3, (n,), generator=generator)
    corners = torch.randint(0, 13, (n, 2), generator=generator)
    for i in range(n):
        if labels[i]:
            r, c = corners[i].tolist()
            images[i, 0, r:r + 4, c:c + 4] += 2.0 if labels[i] == 1 else -2.0
    return images, labels, corners


def peaks_inside(cams: torch.Tensor, corners: torch.Tensor) -> float:
    """The fraction of maps whose maximum lies on (or next to) the 4x4 patch at corners."""
    peaks = cams.flatten(1).argmax(1)
    rows, cols = peaks // cams.shape[-1], peaks % cams.shape[-1]
    inside = ((rows >= corners[:, 0] - 1) & (rows <= corners[:, 0] + 4)
              & (cols >= corners[:, 1] - 1) & (cols <= corners[:, 1] + 4))
    return inside.float().mean().item()


def test_grad_cam_peaks_where_the_evidence_for_the_class_is():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        images, labels, _ = patch_images(64, g)
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad()
    images, labels, corners = patch_images(96, g)
    assert (model(images).argmax(1) == labels).float().mean() > 0.95
    bright = labels == 1
    model.train()
    cams = tk.grad_cam(model, images[bright], "3", class_idx=1)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert cams.shape == (int(bright.sum()), 16, 16)
    assert cams.min() >= 0 and cams.max() <= 1
    assert peaks_inside(cams, corners[bright]) >= 0.9
    # Both kinds of evidence in one image: each class's map peaks at its own patch.
    n = 24
    both = 0.3 * torch.randn(n, 1, 16, 16, generator=g)
    light, dark = torch.randint(0, 5, (n, 2), generator=g), torch.randint(8, 13, (n, 2),
                                                                          generator=g)
    for i in range(n):
        both[i, 0, light[i, 0]:light[i, 0] + 4, light[i, 1]:light[i, 1] + 4] += 2.0
        both[i, 0, dark[i, 0]:dark[i, 0] + 4, dark[i, 1]:dark[i, 1] + 4] -= 2.0
    assert peaks_inside(tk.grad_cam(model, both, "3", class_idx=1), light) >= 0.9
    assert peaks_inside(tk.grad_cam(model, both, "3", class_idx=2), dark) >= 0.9
    # class_idx=None explains the predicted class; a module works as well as its name.
    predicted = model(images).argmax(1)
    torch.testing.assert_close(tk.grad_cam(model, images, model[3]),
                               tk.grad_cam(model, images, "3", class_idx=predicted))
    with torch.no_grad():
        torch.testing.assert_close(tk.grad_cam(model, images[bright][:4], "3", [1, 1, 1, 1]),
                                   cams[:4])


@pytest.mark.parametrize(("family", "layer"), [
    ("resnet18", "layer4"), ("vgg11", "features"), ("mobilenet_v3_small", "features"),
])
def test_grad_cam_on_torchvision_families(family, layer):
    torch.manual_seed(0)
    model = getattr(torchvision.models, family)(weights=None, num_classes=5).eval()
    tk.freeze(model)  # also for a frozen backbone: gradients flow from the inputs
    x = torch.rand(2, 3, 64, 64)
    cams = tk.grad_cam(model, x, layer)
    assert cams.shape == (2, 64, 64) and cams.dtype == torch.float32
    assert cams.min() >= 0 and cams.max() <= 1
    assert all(float(cam.max()) in (0.0, 1.0) for cam in cams)
    assert cams.amax(dim=(1, 2)).sum() > 0
    predicted = model(x).argmax(1)
    torch.testing.assert_close(tk.grad_cam(model, x, layer, predicted), cams)
    assert all(p.grad is None for p in model.parameters())


def test_grad_cam_errors():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        tk.grad_cam(None, x, "0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="inputs must be a floating-point tensor, got "
                                        "torch.int64"):
        tk.grad_cam(model, x.long(), "0")
    with pytest.raises(ValueError, match=r"inputs must have shape \(N, C, H, W\), got \(1, 4, "
                                         r"4\)"):
        tk.grad_cam(model, x[0], "0")
    with pytest.raises(KeyError, match=r"no submodule '00' in Sequential; did you mean 0"):
        tk.grad_cam(model, x, "00")
    with pytest.raises(ValueError, match=r"target_layer \(Conv2d\) is not a submodule"):
        tk.grad_cam(model, x, nn.Conv2d(1, 2, 3))
    with pytest.raises(TypeError, match="target_layer must be a submodule name"):
        tk.grad_cam(model, x, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'2' must output \(N, K, h, w\) feature maps, got "
                                         r"\(2, 3\)"):
        tk.grad_cam(model, x, "2")
    with pytest.raises(ValueError, match=r"class_idx must lie in \[0, 3\), got 3"):
        tk.grad_cam(model, x, "0", class_idx=3)
    with pytest.raises(ValueError, match=r"class_idx must be None, an int or 2 ints"):
        tk.grad_cam(model, x, "0", class_idx=[0])
    net = Net()
    net.unused = nn.Conv2d(1, 1, 1)
    with pytest.raises(RuntimeError, match="'unused' did not run in the forward pass"):
        tk.grad_cam(net, x, "unused")
    with pytest.raises(ValueError, match=r"model must return \(N, num_classes\) scores, got "
                                         r"\(2, 2, 2, 2\)"):
        tk.grad_cam(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Identity()), x, "0")
    assert hooks(model) == 0 and hooks(net) == 0


# --- misclassified --------------------------------------------------------------------


def identity_classifier() -> nn.Module:
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
        model.bias.zero_()
    return model


def test_misclassified_returns_data_order_indices():
    model = identity_classifier()
    inputs = torch.eye(3)[torch.tensor([0, 1, 2, 0, 1, 2, 0])]  # predicts 0 1 2 0 1 2 0
    targets = torch.tensor([0, 2, 2, 1, 1, 0, 0])  # wrong at 1, 3, 5
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=3)
    wrong = tk.misclassified(model, loader)
    assert wrong["indices"].tolist() == [1, 3, 5]
    assert wrong["preds"].tolist() == [1, 0, 2]
    assert wrong["targets"].tolist() == [2, 1, 0]
    torch.testing.assert_close(wrong["inputs"], inputs[[1, 3, 5]])
    # The order is the iterable's: dict batches and one-hot targets work too.
    batches = [{"inputs": inputs[4:], "targets": F.one_hot(targets[4:], 3)},
               {"inputs": inputs[:4], "targets": F.one_hot(targets[:4], 3)}]
    assert tk.misclassified(model, batches)["indices"].tolist() == [1, 4, 6]


def test_misclassified_limit_stops_early_and_restores_modes():
    model = nn.Sequential(identity_classifier(), nn.Dropout(0.99))
    model.train()
    consumed = []

    def batches():
        for i in range(5):
            consumed.append(i)
            yield torch.eye(3)[[0, 1]], torch.tensor([1, 1])  # one mistake per batch

    wrong = tk.misclassified(model, batches(), limit=2)
    assert wrong["indices"].tolist() == [0, 2]  # eval mode: no dropout, exact predictions
    assert consumed == [0, 1] and model.training and model[1].training
    none = tk.misclassified(model, [(torch.eye(3), torch.arange(3))])
    assert none["inputs"].shape == (0, 3) and none["indices"].dtype == torch.long


def test_misclassified_errors():
    model = identity_classifier()
    batch = (torch.eye(3), torch.arange(3))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        tk.misclassified(object(), [batch])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit must be None or an int >= 1, got 0"):
        tk.misclassified(model, [batch], limit=0)
    with pytest.raises(ValueError, match="data yielded no batches"):
        tk.misclassified(model, [])
    with pytest.raises(ValueError, match=r"targets must be 3 class indices or one-hot rows of "
                                         r"shape \(3, 3\), got torch.float32 \(3,\)"):
        tk.misclassified(model, [(torch.eye(3), torch.zeros(3))])
    with pytest.raises(TypeError, match="targets must be a tensor, got list"):
        tk.misclassified(model, [(torch.eye(3), [0, 1, 2])])
    with pytest.raises(ValueError, match=r"model must return \(N, num_classes\) scores, got "
                                         r"\(3, 1, 3\)"):
        tk.misclassified(nn.Unflatten(1, (1, 3)), [batch])
    with pytest.raises(TypeError, match="expects a batch"):
        tk.misclassified(model, [(torch.eye(3),)])


def test_the_inspection_guide_shows_the_pictures_it_draws():
    """docs/guide/inspection.rst draws these (tests/test_readme.py runs its code); the
    copies committed under docs/_static are the ones its ``.. image::`` lines show."""
    import re
    from pathlib import Path

    from PIL import Image

    guide = Path(__file__).resolve().parent.parent / "docs" / "guide" / "inspection.rst"
    text = guide.read_text()
    shown = re.findall(r"^\.\. image:: \.\./_static/inspection/(\w+\.png)$", text, re.M)
    drawn = re.findall(r'path=out / "(\w+\.png)"', text)
    assert shown == drawn == ["feature_maps.png", "grad_cam.png", "misclassified.png"]
    for name in shown:
        path = guide.parent.parent / "_static" / "inspection" / name
        assert path.stat().st_size > 1000
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100
