"""Model surgery: freezing, heads on every torchvision family, insertion, checkpointing."""

from __future__ import annotations

import copy
import fnmatch
import io
import pickle

import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import torchkit as tk


class TinyNet(nn.Module):
    """A small CNN with batch norm, named like a torchvision classifier."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.block(self.stem(x))).flatten(1))


TINY_NAMES = [
    "stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias",
    "block.0.weight", "block.0.bias", "block.1.weight", "block.1.bias",
    "fc.weight", "fc.bias",
]


def images(n: int = 16, size: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable generated images: the class is the brightest colour channel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, size, size, generator=g) + 2.0 * F.one_hot(y, 3)[:, :, None, None]
    return x, y


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> list[float]:
    x, y = images(seed=seed)
    model.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def frozen_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def stats(bn: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for b in bn.buffers()]


# --- freeze / unfreeze: patterns -----------------------------------------------------


def test_freeze_everything_returns_every_name_and_stops_training():
    model = TinyNet()
    assert tk.freeze(model) == TINY_NAMES
    assert frozen_names(model) == set(TINY_NAMES)
    assert tk.count_parameters(model, trainable_only=True) == 0
    assert tk.trainable_parameters(model) == []
    assert tk.freeze(model) == [], "only parameters that change are returned"


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        ("fc", None, {"fc.weight", "fc.bias"}),  # a module name selects its parameters
        ("fc.*", None, {"fc.weight", "fc.bias"}),
        ("*.bias", None, {n for n in TINY_NAMES if n.endswith("bias")}),
        (["stem", "fc.weight"], None, {n for n in TINY_NAMES if n.startswith("stem")}
         | {"fc.weight"}),
        (("block.?.weight",), None, {"block.0.weight", "block.1.weight"}),
        (None, "fc", set(TINY_NAMES) - {"fc.weight", "fc.bias"}),
        ("stem", ["*.bias"], {"stem.0.weight", "stem.1.weight"}),
        ("s[tu]em.1", None, {"stem.1.weight", "stem.1.bias"}),
    ],
)
def test_patterns_select_parameters_by_glob(include, exclude, expected):
    model = TinyNet()
    changed = tk.freeze(model, include, exclude=exclude)
    assert set(changed) == expected == frozen_names(model)
    assert changed == [n for n in TINY_NAMES if n in expected], "named_parameters order"


@given(
    include=st.lists(st.sampled_from(["stem", "block", "fc", "*.weight", "*.1.*", "fc.bias"]),
                     min_size=1, max_size=3),
    exclude=st.lists(st.sampled_from(["stem.0", "*.bias", "block.1"]), max_size=2),
)
def test_freeze_then_unfreeze_is_an_exact_round_trip(include, exclude):
    def selected(name: str, patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)

    model = TinyNet()
    expected = [n for n in TINY_NAMES if selected(n, include) and not selected(n, exclude)]
    assert tk.freeze(model, include, exclude=exclude) == expected
    assert tk.unfreeze(model, include, exclude=exclude) == expected
    assert frozen_names(model) == set()
    assert all(not m._forward_pre_hooks and "train" not in vars(m) for m in model.modules())


def test_frozen_parameters_do_not_move_while_the_rest_learns():
    model = TinyNet()
    tk.freeze(model, "stem")
    before = copy.deepcopy(model.state_dict())
    losses = train(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=15)
    after = model.state_dict()
    for name in TINY_NAMES:
        moved = not torch.equal(before[name], after[name])
        assert moved == (not name.startswith("stem")), name
    assert losses[-1] < 0.5 * losses[0]


def test_shared_parameters_are_frozen_and_counted_once():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    assert tk.freeze(model, "1.weight") == ["1.weight"]
    assert not model[0].weight.requires_grad
    assert tk.count_parameters(model) == 16 + 4 + 4


# --- freeze: batch norm stays in eval mode -------------------------------------------


def test_frozen_batchnorm_keeps_its_statistics_under_train():
    model = TinyNet()
    tk.freeze(model, "stem")
    frozen_before, live_before = stats(model.stem[1]), stats(model.block[1])
    train(model, torch.optim.SGD(tk.trainable_parameters(model), lr=0.1), steps=3)
    model.train()
    assert not model.stem[1].training and model.block[1].training
    for before, after in zip(frozen_before, stats(model.stem[1])):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert not torch.equal(live_before[0], model.block[1].running_mean)
    assert model.block[1].num_batches_tracked.item() == 3
    # In train mode the frozen stem normalises with its running statistics, as in eval.
    x = images()[0]
    reference = copy.deepcopy(model.stem).eval()
    torch.testing.assert_close(model.stem(x), reference(x))


@pytest.mark.parametrize(
    ("norm", "shape"),
    [
        (lambda: nn.BatchNorm1d(4), (6, 4)),
        (lambda: nn.BatchNorm2d(4), (6, 4, 3, 3)),
        (lambda: nn.BatchNorm3d(4), (6, 4, 2, 2, 2)),
        (lambda: nn.SyncBatchNorm(4), (6, 4, 3, 3)),
        (lambda: nn.BatchNorm2d(4, affine=False), (6, 4, 3, 3)),
        (lambda: nn.InstanceNorm2d(4, track_running_stats=True), (6, 4, 3, 3)),
    ],
    ids=["bn1d", "bn2d", "bn3d", "syncbn", "bn-no-affine", "instancenorm"],
)
def test_every_kind_of_batchnorm_is_frozen_and_released(norm, shape):
    model = nn.Sequential(norm(), nn.Identity())
    tk.freeze(model)
    before = stats(model[0])
    model.train()
    model(torch.randn(shape))
    assert not model[0].training
    for b, a in zip(before, stats(model[0])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    tk.unfreeze(model, "0")
    model.train()
    model(torch.randn(shape))
    assert model[0].training
    assert not torch.equal(before[0], model[0].running_mean)


def test_bn_eval_false_lets_the_statistics_move():
    model = TinyNet()
    tk.freeze(model, "stem", bn_eval=False)
    before = stats(model.stem[1])
    model.train()(images()[0])
    assert model.stem[1].training and not torch.equal(before[0], model.stem[1].running_mean)


def test_partly_frozen_or_excluded_batchnorm_keeps_training():
    model = TinyNet()
    tk.freeze(model, "stem.1.weight")  # its bias still trains
    tk.freeze(model, "block", exclude="block.1")
    model.train()(images()[0])
    assert model.stem[1].training and model.block[1].training
    assert model.stem[1].num_batches_tracked.item() == 1


def test_frozen_batchnorm_survives_copy_pickle_and_state_dict():
    model = TinyNet()
    keys = list(model.state_dict())
    tk.freeze(model, "stem")
    assert list(model.state_dict()) == keys and type(model.stem[1]) is nn.BatchNorm2d
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        before = stats(clone.stem[1])
        clone.train()(images()[0])
        torch.testing.assert_close(stats(clone.stem[1]), before, rtol=0, atol=0)
        tk.unfreeze(clone)
        clone.train()(images()[0])
        assert clone.stem[1].num_batches_tracked.item() == 1
    assert model.train().stem[1].training is False, "unfreezing a copy left the original"
    fresh = TinyNet()
    fresh.load_state_dict(model.state_dict())


# --- unfreeze with an optimizer: gradual unfreezing ------------------------------------


def test_gradual_unfreezing_adds_one_param_group_per_stage():
    model = TinyNet()
    tk.freeze(model, exclude="fc")
    opt = torch.optim.SGD(tk.trainable_parameters(model), lr=0.1, momentum=0.9)
    losses = train(model, opt, steps=5)
    assert tk.unfreeze(model, "block", optimizer=opt, lr=0.01) == TINY_NAMES[4:8]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    assert [id(p) for p in opt.param_groups[1]["params"]] == [
        id(p) for p in model.block.parameters()
    ]
    assert opt.param_groups[1]["momentum"] == 0.9, "other options come from the defaults"
    block_before = copy.deepcopy(model.block.state_dict())
    losses += train(model, opt, steps=5)
    assert not torch.equal(block_before["0.weight"], model.block[0].weight)
    assert tk.unfreeze(model, "stem", optimizer=opt) == TINY_NAMES[:4]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01, 0.1]  # default lr
    losses += train(model, opt, steps=5)
    assert losses[-1] < 0.5 * losses[0]


def test_unfreeze_does_not_add_parameters_the_optimizer_already_holds():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tk.freeze(model, "stem")
    assert tk.unfreeze(model, optimizer=opt, lr=0.5) == TINY_NAMES[:4]
    assert len(opt.param_groups) == 1
    assert tk.unfreeze(model, optimizer=opt) == []
    assert len(opt.param_groups) == 1


# --- find_head / replace_head on every torchvision classification family --------------

M = torchvision.models
FAMILIES = {
    # family: (builder with weights=None, input size, head name, head type)
    "resnet": (lambda: M.resnet18(weights=None), 32, "fc", nn.Linear),
    "vgg": (lambda: M.vgg11(weights=None), 32, "classifier.6", nn.Linear),
    "alexnet": (lambda: M.alexnet(weights=None), 64, "classifier.6", nn.Linear),
    "squeezenet": (lambda: M.squeezenet1_1(weights=None), 32, "classifier.1", nn.Conv2d),
    "densenet": (lambda: M.densenet121(weights=None), 32, "classifier", nn.Linear),
    "mobilenet_v2": (lambda: M.mobilenet_v2(weights=None), 32, "classifier.1", nn.Linear),
    "mobilenet_v3": (lambda: M.mobilenet_v3_small(weights=None), 32, "classifier.3", nn.Linear),
    "efficientnet": (lambda: M.efficientnet_b0(weights=None), 32, "classifier.1", nn.Linear),
    "efficientnet_v2": (lambda: M.efficientnet_v2_s(weights=None), 32, "classifier.1",
                        nn.Linear),
    "regnet": (lambda: M.regnet_y_400mf(weights=None), 32, "fc", nn.Linear),
    "shufflenet": (lambda: M.shufflenet_v2_x0_5(weights=None), 32, "fc", nn.Linear),
    "mnasnet": (lambda: M.mnasnet0_5(weights=None), 32, "classifier.1", nn.Linear),
    "convnext": (lambda: M.convnext_tiny(weights=None), 32, "classifier.2", nn.Linear),
    "vit": (lambda: M.vit_b_16(weights=None, image_size=32), 32, "heads.head", nn.Linear),
    "swin": (lambda: M.swin_t(weights=None), 32, "head", nn.Linear),
    "googlenet": (lambda: M.googlenet(weights=None, aux_logits=True, init_weights=False), 32,
                  "fc", nn.Linear),
    "inception": (lambda: M.inception_v3(weights=None, aux_logits=True, init_weights=False),
                  75, "fc", nn.Linear),
    "maxvit": (lambda: M.maxvit_t(weights=None), 224, "classifier.5", nn.Linear),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_replace_head_on_every_torchvision_family(family):
    build, size, head_name, head_type = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    name, old = tk.find_head(model)
    assert name == head_name and isinstance(old, nn.Module)
    tk.freeze(model)
    new = tk.replace_head(model, 5)
    assert type(new) is head_type and model.get_submodule(head_name) is new
    assert all(p.requires_grad for p in new.parameters())
    assert tk.trainable_parameters(model) == list(new.parameters())
    if isinstance(new, nn.Conv2d):
        assert new.kernel_size == (1, 1) and new.in_channels == old.in_channels
    else:
        assert new.in_features == old.in_features
    assert (new.bias is None) == (old.bias is None)
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 5)


@pytest.mark.parametrize("family", ["resnet", "squeezenet", "vit"])
def test_replaced_head_state_dict_loads_into_a_model_edited_the_same_way(family, tmp_path):
    build, size, _, _ = FAMILIES[family]
    model = build().eval()
    tk.replace_head(model, 4)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    other = build().eval()
    tk.replace_head(other, 4)
    other.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


def test_inception_auxiliary_head_is_left_alone():
    model = M.inception_v3(weights=None, aux_logits=True, init_weights=False)
    tk.replace_head(model, 6)
    assert model.fc.out_features == 6 and model.AuxLogits.fc.out_features == 1000


def test_fine_tuning_a_new_head_on_a_frozen_backbone_learns():
    torch.manual_seed(0)
    model = TinyNet(num_classes=10)
    tk.freeze(model)
    tk.replace_head(model, 3)
    opt = torch.optim.Adam(tk.trainable_parameters(model), lr=0.1)
    losses = train(model, opt, steps=30)
    assert losses[-1] < 0.5 * losses[0]
    assert tk.count_parameters(model, trainable_only=True) == 8 * 3 + 3


def test_replace_head_matches_dtype_and_device():
    model = TinyNet().double()
    assert tk.replace_head(model, 2).weight.dtype == torch.float64
    given = tk.replace_head(model, nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 2)), name="fc")
    assert given[1].weight.dtype == torch.float64 and model.fc is given
    assert model(images()[0].double()).shape == (16, 2)
    with torch.device("meta"):
        meta = TinyNet()
    assert tk.replace_head(meta, 7).weight.device.type == "meta"


def test_replace_head_by_name_keeps_conv_geometry_and_bias():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Conv1d(4, 6, 1, bias=False))
    new = tk.replace_head(model, 3, name="1")
    assert isinstance(new, nn.Conv1d) and new.kernel_size == (1,) and new.bias is None
    assert model(torch.randn(1, 2, 10)).shape == (1, 3, 8)
    wide = tk.replace_head(model, 5, name="0")
    assert wide.kernel_size == (3,) and wide.out_channels == 5


def test_find_head_refuses_a_backbone_without_a_head():
    model = TinyNet()
    model.fc = nn.Identity()
    with pytest.raises(ValueError, match=r"last layer with parameters, 'block\.1', is a "
                                         r"BatchNorm2d, not an nn\.Linear"):
        tk.find_head(model)
    with pytest.raises(ValueError, match="no submodule has parameters"):
        tk.find_head(nn.Sequential(nn.ReLU(), nn.Flatten()))


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("3",), {}, TypeError, "must be a number of classes \\(int\\) or an nn.Module, got str"),
        ((True,), {}, TypeError, "got bool"),
        ((0,), {}, ValueError, "must be >= 1 classes, got 0"),
        ((3,), {"name": ""}, ValueError, "got '' \\(the model itself\\)"),
        ((3,), {"name": "head"}, KeyError, "no submodule 'head' in TinyNet: the children of "
                                           "TinyNet are: stem, block, pool, fc"),
        ((3,), {"name": "stem.1"}, TypeError, "cannot read the input size of 'stem.1', a "
                                              "BatchNorm2d"),
    ],
)
def test_replace_head_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        tk.replace_head(TinyNet(), *args, **kwargs)


def test_replace_head_refuses_a_lazy_head_that_has_not_run():
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(4))
    with pytest.raises(ValueError, match="lazy LazyLinear that has not run yet"):
        tk.replace_head(model, 2)
    with pytest.raises(ValueError, match="cannot count parameters 1.weight, 1.bias"):
        tk.count_parameters(model)
    model(torch.randn(2, 3))
    assert tk.replace_head(model, 2).in_features == 3


# --- insert_after / insert_before -------------------------------------------------------


def test_insert_after_and_before_put_the_module_on_the_forward_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    first, second = model[0], model[1]
    x = torch.randn(5, 4)
    assert tk.insert_after(model, "0", nn.ReLU()) is model
    torch.testing.assert_close(model(x), second(F.relu(first(x))))
    tk.insert_before(model, "1", nn.Tanh())
    torch.testing.assert_close(model(x), second(torch.tanh(F.relu(first(x)))))
    tk.insert_after(model, "0", nn.Dropout(0.5))  # after the ReLU inserted before
    assert isinstance(model[0][1], nn.Dropout) and isinstance(model[0][0][1], nn.ReLU)
    assert list(model.state_dict()) == ["0.0.0.weight", "0.0.0.bias", "1.1.weight", "1.1.bias"]


def test_insert_inside_a_torchvision_model_keeps_training_and_state_dict(tmp_path):
    def edited() -> nn.Module:
        torch.manual_seed(0)
        model = M.resnet18(weights=None, num_classes=3)
        tk.insert_after(model, "layer4.1.conv2", nn.Dropout2d(0.1))
        tk.insert_before(model, "fc", nn.Linear(512, 512))
        return model

    model = edited()
    assert isinstance(model.layer4[1].conv2[1], nn.Dropout2d)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train(model, opt, steps=2)
    x = images(n=4, size=32)[0]
    torch.save(model.state_dict(), tmp_path / "edited.pt")
    other = edited()
    other.load_state_dict(torch.load(tmp_path / "edited.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), model.eval()(x), rtol=0, atol=0)
    assert "fc.0.weight" in model.state_dict() and "fc.1.weight" in model.state_dict()


def test_inserted_module_matches_dtype():
    model = nn.Sequential(nn.Linear(4, 4)).double()
    tk.insert_after(model, "0", nn.Linear(4, 2))
    assert model[0][1].weight.dtype == torch.float64
    assert model(torch.randn(3, 4, dtype=torch.float64)).shape == (3, 2)


@pytest.mark.parametrize("insert", [tk.insert_after, tk.insert_before])
def test_insert_errors(insert):
    model = TinyNet()
    with pytest.raises(KeyError, match=r"no submodule 'stem\.7' in TinyNet: the children of "
                                       r"'stem' are: stem\.0, stem\.1, stem\.2"):
        insert(model, "stem.7", nn.ReLU())
    with pytest.raises(KeyError, match=r"children of TinyNet are: stem, block, pool, fc; "
                                       r"did you mean block\?"):
        insert(model, "blok", nn.ReLU())
    with pytest.raises(TypeError, match="name must be a qualified submodule name"):
        insert(model, 0, nn.ReLU())
    with pytest.raises(TypeError, match="module must be an nn.Module, got function"):
        insert(model, "fc", F.relu)
    with pytest.raises(ValueError, match="got '' \\(the model itself\\)"):
        insert(model, "", nn.ReLU())
    with pytest.raises(ValueError, match="contains 'stem.0'.*would call itself"):
        insert(model, "stem.0", model.stem)
    assert list(model.state_dict()) == list(TinyNet().state_dict()), "nothing changed"


# --- checkpoint_activations -------------------------------------------------------------


class Deep(nn.Module):
    def __init__(self, depth: int = 4, width: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(6, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.GELU(),
                          nn.Dropout(0.2))
            for _ in range(depth)
        )
        self.out = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


def test_checkpointed_training_equals_plain_training_exactly():
    plain = Deep()
    wrapped = copy.deepcopy(plain)
    assert tk.checkpoint_activations(wrapped, "blocks.*") == [f"blocks.{i}" for i in range(4)]
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    runs = []
    for model in (plain, wrapped):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(3)  # the same dropout masks
        for _ in range(3):
            F.cross_entropy(model(x), y).backward()
            runs.append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
            opt.zero_grad()
    for plain_grads, wrapped_grads in zip(runs[:3], runs[3:]):
        torch.testing.assert_close(wrapped_grads, plain_grads, rtol=0, atol=0)
    # Same weights and batch-norm statistics: the recomputation updated nothing twice.
    torch.testing.assert_close(wrapped.state_dict(), plain.state_dict(), rtol=0, atol=0)
    assert wrapped.blocks[0][1].num_batches_tracked.item() == 3


def test_checkpointed_torchvision_resnet_has_the_same_gradients_and_keys():
    torch.manual_seed(0)
    plain = M.resnet18(weights=None, num_classes=4)
    wrapped = copy.deepcopy(plain)
    assert tk.checkpoint_activations(wrapped, "layer*") == ["layer1", "layer2", "layer3",
                                                            "layer4"]
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    x, y = images(n=4, size=32)
    for model in (plain, wrapped):
        F.cross_entropy(model(x), y).backward()
    for (name, p), q in zip(plain.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    torch.testing.assert_close(wrapped.state_dict(), plain.state_dict(), rtol=0, atol=0)


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return total


def test_checkpointing_saves_fewer_activations_and_recomputes_once():
    model = Deep(depth=8, width=64)
    x = torch.randn(64, 6)
    plain = saved_bytes(model, x)
    tk.checkpoint_activations(model, "blocks.*")
    tk.checkpoint_activations(model, ["blocks.*"])  # again: no double wrapping
    assert saved_bytes(model, x) < 0.3 * plain

    calls = []
    model.blocks[0][0].register_forward_hook(lambda *_: calls.append(1))
    model(x).sum().backward()
    assert len(calls) == 2, "one forward and one recomputation"
    with torch.no_grad():
        model(x)
    assert len(calls) == 3, "no checkpointing without gradients"


def test_checkpointed_model_copies_and_pickles():
    model = Deep()
    tk.checkpoint_activations(model, "blocks.1")
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.blocks[1].forward.module is clone.blocks[1]
        with torch.no_grad():
            clone.blocks[1][0].weight.zero_()
        assert not torch.equal(clone.eval()(torch.ones(2, 6)), model.eval()(torch.ones(2, 6)))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    Deep().load_state_dict(torch.load(buffer, weights_only=True))


def test_checkpoint_activations_errors():
    with pytest.raises(ValueError, match="include must be a pattern or a non-empty list"):
        tk.checkpoint_activations(Deep(), [])
    with pytest.raises(ValueError, match=r"'block\.\*' matched no submodule of Deep; did you "
                                         r"mean blocks"):
        tk.checkpoint_activations(Deep(), "block.*")
    with pytest.raises(TypeError, match="include must be a glob pattern"):
        tk.checkpoint_activations(Deep(), 3)


# --- counting and summary -----------------------------------------------------------------


def test_count_parameters_of_a_torchvision_resnet():
    model = M.resnet18(weights=None)
    assert tk.count_parameters(model) == 11_689_512
    tk.freeze(model, exclude="fc")
    assert tk.count_parameters(model, trainable_only=True) == 512 * 1000 + 1000
    assert sum(p.numel() for p in tk.trainable_parameters(model)) == 513_000


def test_summary_rows_shapes_and_counts():
    model = TinyNet()
    tk.freeze(model, "stem")
    model.train()
    before = copy.deepcopy(model.state_dict())
    result = tk.summary(model, torch.randn(2, 3, 8, 8))
    assert [(r.name, r.type, r.output_shape) for r in result.layers[:4]] == [
        ("stem", "Sequential", (2, 8, 8, 8)),
        ("stem.0", "Conv2d", (2, 8, 8, 8)),
        ("stem.1", "BatchNorm2d", (2, 8, 8, 8)),
        ("stem.2", "ReLU", (2, 8, 8, 8)),
    ]
    assert result.layers[-1] == tk.LayerSummary("fc", "Linear", (2, 3), 27, 27)
    assert result.layers[0].num_params == 3 * 8 * 9 + 8 + 16 and result.layers[0].num_trainable == 0
    assert (result.num_params, result.num_trainable) == (tk.count_parameters(model), 27 + 600)
    text = str(result)
    assert "fc (Linear)" in text and "[2, 3]" in text and "frozen: 240" in text
    # The model is left as it was: modes, statistics, hooks.
    assert model.training and model.block[1].training and not model.stem[1].training
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)
    assert all(not m._forward_hooks for m in model.modules())


def test_summary_max_depth_tuple_inputs_and_outputs():
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(2, 3), nn.Sequential(nn.Linear(4, 5))

        def forward(self, x, y):
            return self.a(x), {"b": self.b(y)}

    result = tk.summary(Pair(), (torch.randn(1, 2), torch.randn(1, 4)), max_depth=1)
    assert [(r.name, r.output_shape) for r in result.layers] == [("a", (1, 3)), ("b", (1, 5))]
    result = tk.summary(nn.LSTM(3, 4, batch_first=True), torch.randn(2, 5, 3))
    assert result.layers == ()
    assert "([2, 5, 4], ([1, 2, 4], [1, 2, 4]))" in str(
        tk.summary(nn.Sequential(nn.LSTM(3, 4, batch_first=True)), torch.randn(2, 5, 3))
    )
    with pytest.raises(ValueError, match="max_depth must be an int >= 1 or None, got 0"):
        tk.summary(Pair(), (torch.randn(1, 2), torch.randn(1, 4)), max_depth=0)


# --- argument errors shared by every function ----------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda m: tk.freeze(m), lambda m: tk.unfreeze(m), lambda m: tk.find_head(m),
        lambda m: tk.replace_head(m, 2), lambda m: tk.insert_after(m, "a", nn.ReLU()),
        lambda m: tk.insert_before(m, "a", nn.ReLU()),
        lambda m: tk.checkpoint_activations(m, "*"), lambda m: tk.count_parameters(m),
        lambda m: tk.trainable_parameters(m), lambda m: tk.summary(m, torch.ones(1)),
    ],
)
def test_every_function_wants_a_module(call):
    with pytest.raises(TypeError, match="model must be an nn.Module, got dict"):
        call({"fc.weight": torch.ones(1)})


@pytest.mark.parametrize("op", [tk.freeze, tk.unfreeze])
def test_pattern_errors_name_what_exists(op):
    with pytest.raises(ValueError, match=r"include pattern 'fc2' matched no parameter of "
                                         r"TinyNet; did you mean fc\? \(10 names in all\)"):
        op(TinyNet(), "fc2")
    with pytest.raises(ValueError, match=r"include pattern 'head\*' and exclude pattern 'x' "
                                         r"matched no parameter of TinyNet; the names look like: "
                                         r"stem\.0\.weight, .*fc\.bias \(10 in all\)"):
        op(TinyNet(), "head*", exclude=["x"])
    with pytest.raises(ValueError, match="include must be a pattern or a non-empty list of "
                                         "patterns, got \\[\\]; pass None"):
        op(TinyNet(), [])
    with pytest.raises(TypeError, match="exclude must be a glob pattern .* got \\[1\\]"):
        op(TinyNet(), exclude=[1])


def test_unfreeze_option_errors():
    model = TinyNet()
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        tk.unfreeze(model, optimizer=[])
    with pytest.raises(ValueError, match="lr must be a finite number >= 0 or None, got -1; "
                                         "lr was given without an optimizer"):
        tk.unfreeze(model, lr=-1)
    assert frozen_names(model) == set(), "nothing changed"
