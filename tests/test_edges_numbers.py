"""Issue 13, numbers: mixed-dtype norms, clip by value in the loop, accumulate=1 bitwise."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkit as tk


def mixed_params(big: float) -> list[nn.Parameter]:
    a = nn.Parameter(torch.ones(2))
    b = nn.Parameter(torch.ones(2, dtype=torch.float64))
    a.grad = torch.ones(2)
    b.grad = torch.full((2,), big, dtype=torch.float64)
    return [a, b]


def test_grad_norm_combines_float32_and_float64_in_float64():
    params = mixed_params(1e39)
    expected = torch.nn.utils.get_total_norm([p.grad for p in params])
    total = tk.grad_norm(params)
    assert total.dtype == torch.float64
    assert torch.isfinite(total)
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)


def test_clip_grad_norm_scales_a_float64_gradient_beyond_float32_range():
    params, reference = mixed_params(1e39), mixed_params(1e39)
    total = tk.clip_grad_norm(params, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(reference, 1.0)
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)
    for p, q in zip(params, reference):
        assert torch.isfinite(p.grad).all()
        torch.testing.assert_close(p.grad, q.grad)
    assert params[1].grad.abs().max() > 0.7  # scaled, not zeroed


class Inject(torch.autograd.Function):
    """Identity forward; backward hands the input a gradient of 1e39 (finite in float64)."""

    @staticmethod
    def forward(ctx, w):
        return w.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, 1e39)


def float64_weight_model() -> nn.Linear:
    model = nn.Linear(1, 1)
    model.weight.data = model.weight.data.double()  # float64 weight beside a float32 bias
    return model


def big_loss(model: nn.Linear) -> torch.Tensor:
    return Inject.apply(model.weight).sum().float() + model.bias.sum()


def test_grad_accumulator_max_norm_combines_in_float64():
    model = float64_weight_model()
    accum = tk.GradAccumulator(torch.optim.SGD(model.parameters(), lr=1.0), 1, max_norm=1.0)
    before = model.weight.detach().clone()
    with accum.accumulate():
        loss = big_loss(model)
    assert accum.backward(loss) is True
    assert torch.isfinite(accum.last_grad_norm) and accum.last_grad_norm > 1e38
    # the float64 gradient is scaled to norm ~1, not zeroed by an inf total
    torch.testing.assert_close(before - model.weight.detach(),
                               torch.ones(1, 1, dtype=torch.float64))


def test_trainer_max_grad_norm_combines_in_float64():
    model = float64_weight_model()
    before = model.weight.detach().clone()

    class Big(tk.Trainer):
        def train_step(self, batch):
            return big_loss(self.model)

    trainer = Big(model, torch.optim.SGD(model.parameters(), lr=1.0), max_grad_norm=1.0,
                  progress=False)
    trainer.fit([torch.ones(1, 1)], epochs=1)
    assert torch.isfinite(trainer.accumulator.last_grad_norm)
    assert trainer.accumulator.last_grad_norm > 1e38
    torch.testing.assert_close(before - model.weight.detach(),
                               torch.ones(1, 1, dtype=torch.float64))


# -- clip by value inside the loop ----------------------------------------------------------

def test_grad_accumulator_clip_value_before_the_step_then_norm():
    w = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([w], lr=1.0)
    accum = tk.GradAccumulator(opt, 2, clip_value=1.0, max_norm=1.0)
    for scale in (2.0, 4.0):  # summed mean gradient [-3, 0.15, 4.5] before any clipping
        with accum.accumulate():
            loss = (w * torch.tensor([-1.0, 0.05, 1.5]) * scale).sum()
        accum.backward(loss)
    # value first: [-1, 0.15, 1] (norm 1.4222), then norm: divided by it
    expected = -torch.tensor([-1.0, 0.15, 1.0]) / (torch.tensor([-1.0, 0.15, 1.0]).norm() + 1e-6)
    torch.testing.assert_close(w.detach(), expected)
    torch.testing.assert_close(accum.last_grad_norm, torch.tensor([-1.0, 0.15, 1.0]).norm())


@settings(max_examples=25, deadline=None)
@given(clip=st.floats(1e-3, 10.0), scale=st.floats(-50.0, 50.0))
def test_grad_accumulator_clip_value_matches_clamp(clip, scale):
    w = nn.Parameter(torch.zeros(4))
    accum = tk.GradAccumulator(torch.optim.SGD([w], lr=1.0), 1, clip_value=clip)
    g = torch.tensor([1.0, -2.0, 0.5, 3.0]) * scale
    with accum.accumulate():
        loss = (w * g).sum()
    accum.backward(loss)
    torch.testing.assert_close(w.detach(), -g.clamp(-clip, clip))


def test_grad_accumulator_clip_value_after_unscale():
    w = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    accum = tk.GradAccumulator(opt, 1, scaler=scaler, clip_value=0.5)
    with accum.accumulate():
        loss = (w * torch.tensor([0.25, 3.0])).sum()
    accum.backward(loss)
    torch.testing.assert_close(w.detach(), -torch.tensor([0.25, 0.5]))


def test_trainer_clip_value():
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    trainer = tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=1.0),
                         lambda out, y: (out * y).sum(), clip_value=0.1, progress=False)
    trainer.fit([(torch.ones(1, 1), torch.full((1, 1), 5.0))], epochs=1)
    torch.testing.assert_close(model.weight.detach(), torch.full((1, 1), -0.1))
    assert trainer.accumulator.clip_value == 0.1


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1", True])
def test_clip_value_options_are_checked_by_name(bad):
    w = nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="clip_value"):
        tk.GradAccumulator(torch.optim.SGD([w], lr=1.0), 1, clip_value=bad)
    with pytest.raises(ValueError, match="clip_value"):
        tk.Trainer(nn.Linear(1, 1), torch.optim.SGD([w], lr=1.0), clip_value=bad)


# -- accumulate=1 is bitwise the canonical loop -------------------------------------------

def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=g)
    y = torch.randint(0, 3, (50,), generator=g)
    # 4 batches of 12, then 2: a weight of 2/12 and back is not exact in floating point
    return DataLoader(TensorDataset(x, y), batch_size=12)


def make(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)


def canonical(epochs: int) -> nn.Module:
    model, opt = make()
    for _ in range(epochs):
        for x, y in loader():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
    return model


def assert_bitwise(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_trainer_accumulate_1_is_bitwise_the_canonical_loop(nonfinite):
    model, opt = make()
    tk.Trainer(model, opt, nn.functional.cross_entropy, progress=False,
               nonfinite=nonfinite).fit(loader(), epochs=3)
    assert_bitwise(model, canonical(3))


@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_grad_accumulator_1_with_batch_size_is_bitwise_the_canonical_loop(skip_nonfinite):
    model, opt = make()
    accum = tk.GradAccumulator(opt, 1, skip_nonfinite=skip_nonfinite)
    for _ in range(3):
        for x, y in loader():
            with accum.accumulate():
                loss = nn.functional.cross_entropy(model(x), y)
            accum.backward(loss, batch_size=len(x))
    assert_bitwise(model, canonical(3))
