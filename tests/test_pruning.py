"""Pruning helpers: exact counts, structure, checkpoints, copies and the schedule."""

from __future__ import annotations

import copy
import io
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import torchkit as tk
from tests.test_quantization import accuracy, digits, fit, trained_mlp


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 20),
                         nn.ReLU(), nn.Linear(20, 10))


def layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def zeros(model: nn.Module) -> int:
    return sum(int((m.weight == 0).sum()) for m in layers(model))


def total(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in layers(model))


@pytest.mark.parametrize("method", ["l1", "random"])
@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_global_prunes_exact_count(method: str, amount: float) -> None:
    model = tk.prune(make_net(), amount, method=method)
    assert abs(zeros(model) - round(amount * total(model))) <= 1
    assert tk.sparsity(model)["total"] == pytest.approx(zeros(model) / total(model))


def test_global_l1_removes_the_smallest_magnitudes() -> None:
    model = make_net()
    weights = torch.cat([m.weight.detach().abs().flatten() for m in layers(model)])
    tk.prune(model, 0.4)
    kept = torch.cat([m.weight.detach().abs().flatten() for m in layers(model)])
    threshold = weights.sort().values[round(0.4 * len(weights)) - 1]
    assert bool((weights[kept == 0] <= threshold).all())


def test_layer_scope_prunes_each_layer_by_amount() -> None:
    model = tk.prune(make_net(), 0.3, scope="layer")
    for layer in layers(model):
        assert abs(int((layer.weight == 0).sum()) - round(0.3 * layer.weight.numel())) <= 1


@pytest.mark.parametrize(("dim", "n"), [(0, 2), (1, 1), (0, float("inf"))])
def test_ln_structured_zeros_whole_slices(dim: int, n: float) -> None:
    model = tk.prune(make_net(), 0.5, method="ln", scope="layer", n=n, dim=dim,
                     modules=(nn.Linear,))
    for layer in layers(model)[1:]:
        w = layer.weight.detach().movedim(dim, 0).flatten(1)
        dead = (w == 0).all(dim=1)
        assert int(dead.sum()) == round(0.5 * w.shape[0])
        assert int((w[~dead] == 0).sum()) == 0  # nothing pruned outside whole slices
    assert tk.sparsity(model)["0"] == 0.0  # the conv was not in ``modules``


def test_pruning_twice_prunes_the_remaining_weights() -> None:
    model = tk.prune(tk.prune(make_net(), 0.5), 0.5)
    assert abs(zeros(model) - round(0.75 * total(model))) <= 2


def test_pruned_weights_stay_zero_while_training() -> None:
    model = tk.prune(make_net(), 0.5)
    mask = [m.weight_mask.clone() for m in layers(model)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(8, 1, 8, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for layer, m in zip(layers(model), mask):
        assert bool((layer.weight[m == 0] == 0).all())


def test_deepcopy_right_after_pruning_and_after_backward() -> None:
    model = tk.prune(make_net(), 0.5)
    clone = copy.deepcopy(model)
    x = torch.randn(4, 1, 8, 8)
    model(x).sum().backward()
    clone2 = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))
        torch.testing.assert_close(clone2(x), model(x))
    assert tk.sparsity(clone2) == tk.sparsity(model)


def roundtrip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_pruned_checkpoint_resumes_pruned() -> None:
    model = tk.prune(make_net(), 0.6)
    saved = roundtrip(model.state_dict())
    fresh = make_net()
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(saved)  # torch alone cannot
    tk.restore_pruning(fresh, saved)
    fresh.load_state_dict(saved)  # strict
    assert tk.sparsity(fresh) == tk.sparsity(model)  # right before any forward, too
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    for a, b in zip(layers(fresh), layers(model)):
        assert torch.equal(a.weight_mask, b.weight_mask)
    tk.restore_pruning(fresh, saved)  # already pruned: nothing changes
    assert len(fresh[0]._forward_pre_hooks) == 1


def test_removed_pruning_loads_strictly_into_plain_model() -> None:
    model = tk.prune(make_net(), 0.6)
    sparsity = tk.sparsity(model)
    tk.remove_pruning(model)
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())
    plain = make_net()
    plain.load_state_dict(roundtrip(model.state_dict()))  # strict
    assert tk.sparsity(plain) == sparsity
    copy.deepcopy(model)
    assert all(not m._forward_hooks for m in model.modules())


def test_half_global_l1_keeps_digits_accuracy() -> None:
    model = trained_mlp()
    _, _, x, y = digits()
    pruned = tk.prune(copy.deepcopy(model), 0.5)
    assert tk.sparsity(pruned)["total"] == pytest.approx(0.5, abs=1e-4)
    assert abs(accuracy(pruned, x, y) - accuracy(model, x, y)) <= 0.02


def test_sparsity_per_layer() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.zero_()
    assert tk.sparsity(model) == {"0": 1.0, "2": 0.0, "total": 16 / 24}
    assert tk.sparsity(nn.Linear(2, 2)) == {"Linear": 0.0, "total": 0.0}


# --- the schedule -------------------------------------------------------------------------


def test_schedule_reaches_target_and_stops() -> None:
    model = make_net()
    schedule = tk.PruningSchedule(0.75, epochs=4)
    reached = [schedule.step(model) for _ in range(6)]
    assert reached == sorted(reached) and reached[3:] == [0.75] * 3
    assert tk.sparsity(model)["total"] == pytest.approx(0.75, abs=2 / total(model))


def test_schedule_as_callback_waits_for_start_epoch() -> None:
    model = make_net()
    schedule = tk.PruningSchedule(0.5, epochs=2, start_epoch=1, scope="layer")
    trainer = SimpleNamespace(model=model, epoch=0)
    schedule.on_epoch_end(trainer, {"val_loss": 1.0})
    assert schedule.num_steps == 0 and tk.sparsity(model)["total"] == 0.0
    for epoch in (1, 2):
        trainer.epoch = epoch
        schedule.on_epoch_end(trainer, {})
    assert tk.sparsity(model)["total"] == pytest.approx(0.5, abs=0.01)


def test_schedule_fine_tunes_digits_to_high_sparsity() -> None:
    model = copy.deepcopy(trained_mlp())
    x, y, x_test, y_test = digits()
    schedule = tk.PruningSchedule(0.8, epochs=3)
    for _ in range(3):
        schedule.step(model)
        fit(model, x, y, epochs=1, lr=1e-3)
    assert tk.sparsity(model)["total"] == pytest.approx(0.8, abs=1e-3)
    assert accuracy(model, x_test, y_test) >= accuracy(trained_mlp(), x_test, y_test) - 0.02


@given(target=st.floats(0.0, 0.95), epochs=st.integers(1, 6), done=st.integers(0, 7))
def test_schedule_state_round_trip_does_not_change_decisions(
    target: float, epochs: int, done: int
) -> None:
    model_a = make_net()
    a = tk.PruningSchedule(target, epochs=epochs)
    for _ in range(done):
        a.step(model_a)
    b = tk.PruningSchedule(target, epochs=epochs)
    b.load_state_dict(roundtrip(a.state_dict()))
    model_b = copy.deepcopy(model_a)
    assert [a.step(model_a) for _ in range(2)] == [b.step(model_b) for _ in range(2)]
    assert tk.sparsity(model_a) == tk.sparsity(model_b)


# --- errors -------------------------------------------------------------------------------


def test_prune_errors() -> None:
    net = make_net()
    cases = [
        (TypeError, "model must be an nn.Module", lambda: tk.prune("net", 0.5)),
        (TypeError, "modules must be a non-empty tuple",
         lambda: tk.prune(net, 0.5, modules=nn.Linear)),
        (TypeError, "modules must be a non-empty tuple", lambda: tk.prune(net, 0.5, modules=())),
        (ValueError, r"no layer with a weight of types \['LSTM'\]",
         lambda: tk.prune(net, 0.5, modules=(nn.LSTM,))),
        (ValueError, r"amount must be a fraction in \[0, 1\], got 1.5", lambda: tk.prune(net, 1.5)),
        (ValueError, "amount must be a fraction", lambda: tk.prune(net, True)),
        (ValueError, "method must be 'l1', 'random' or 'ln'",
         lambda: tk.prune(net, 0.1, method="l2")),
        (ValueError, "scope must be 'global' or 'layer'", lambda: tk.prune(net, 0.1, scope="net")),
        (ValueError, "pass scope='layer'", lambda: tk.prune(net, 0.1, method="ln")),
        (ValueError, "n must be a positive number",
         lambda: tk.prune(net, 0.1, method="ln", scope="layer", n=0)),
        (ValueError, r"dim must be an int in \[-2, 2\), got 2",
         lambda: tk.prune(net, 0.1, method="ln", scope="layer", dim=2)),
        (TypeError, "model must be an nn.Module", lambda: tk.remove_pruning(None)),
        (TypeError, "state_dict must be a mapping", lambda: tk.restore_pruning(net, [])),
        (TypeError, "model must be an nn.Module", lambda: tk.sparsity(None)),
        (ValueError, "has no layer of types", lambda: tk.sparsity(nn.ReLU())),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()
    assert tk.sparsity(net)["total"] == 0.0  # the failed calls pruned nothing


def test_restore_pruning_names_a_foreign_mask() -> None:
    saved = tk.prune(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), 0.5).state_dict()
    with pytest.raises(KeyError, match=r"pruning mask '1.weight_mask'.*submodule '1'"):
        tk.restore_pruning(nn.Sequential(nn.Linear(4, 4)), saved)


def test_schedule_errors() -> None:
    with pytest.raises(ValueError, match=r"target must be a number in \[0, 1\), got 1.0.*"
                                         r"epochs must be an int >= 1, got 0.*start_epoch"):
        tk.PruningSchedule(1.0, epochs=0, start_epoch=-1)
    with pytest.raises(KeyError, match="missing keys"):
        tk.PruningSchedule(0.5, epochs=2).load_state_dict({})
