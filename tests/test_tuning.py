"""find_lr: through GradAccumulator (accumulation, bf16 autocast), burn-in, log-LR slope,
divergence, bitwise restore of model/optimizer/RNG, and the plot."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchkit as tk


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def _xy(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def test_restores_model_optimizer_and_rng_bitwise():
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = _xy()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # the optimizer has state to keep
    opt.zero_grad()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    moments = [s["exp_avg"].clone() for s in opt.state.values()]
    rng = tk.get_rng_state()
    expected_next = torch.rand(3)
    tk.set_rng_state(rng)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    result = tk.find_lr(model, opt, F.cross_entropy, loader, num_steps=12)
    assert len(result.lrs) == 12
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key])
    assert opt.state_dict()["param_groups"] == opt_state["param_groups"]
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(opt.state.values(), moments))
    assert torch.equal(torch.rand(3), expected_next)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_lrs_grow_exponentially_and_group_ratios_are_kept():
    model = _net()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": model[3].parameters(), "lr": 0.01}], lr=0.1)
    seen = []
    original_step = opt.step

    def step(*args: object, **kwargs: object) -> object:
        seen.append([g["lr"] for g in opt.param_groups])
        return original_step(*args, **kwargs)

    opt.step = step  # type: ignore[method-assign]
    x, y = _xy()
    result = tk.find_lr(model, opt, F.cross_entropy, [(x, y)], start_lr=1e-4, end_lr=1.0,
                        num_steps=5, diverge=1e9)
    assert result.lrs == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    assert [s[1] / s[0] for s in seen] == pytest.approx([0.1] * 5)


def test_accumulation_equals_one_big_batch():
    x, y = _xy(64)
    big = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    small = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    a = tk.find_lr(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, big,
                   num_steps=8, end_lr=1.0)
    b = tk.find_lr(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, small,
                   num_steps=8, end_lr=1.0, accumulate=2)
    assert len(a.raw_losses) == len(b.raw_losses) == 8
    torch.testing.assert_close(torch.tensor(b.raw_losses), torch.tensor(a.raw_losses),
                               rtol=1e-5, atol=1e-6)


def test_bf16_autocast_is_used():
    x, y = _xy(32)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(model(x), y).float().item()
    with torch.no_grad():
        full = F.cross_entropy(model(x), y).item()
    result = tk.find_lr(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy,
                        [(x, y)], num_steps=3, precision="bf16")
    assert result.raw_losses[0] == expected
    assert expected != full


def test_stops_on_divergence():
    x, y = _xy()
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    result = tk.find_lr(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy,
                        [(x * 10, y)], start_lr=1e-3, end_lr=1e4, num_steps=100)
    assert result.diverged
    assert len(result.lrs) < 100
    last = result.losses[-1]
    assert not math.isfinite(last) or last > 4.0 * min(result.losses[:-1])


def _synthetic(losses: list[float], *, diverged: bool = False) -> tk.LRFinderResult:
    lrs = [10 ** (-6 + 0.25 * i) for i in range(len(losses))]
    return tk.LRFinderResult(lrs, losses, diverged=diverged)


def test_suggestion_skips_a_burn_in_and_uses_the_log_lr_slope():
    # An early spike falls steeply at first (index 0-1): not the LR to pick.
    losses = [5.0, 2.0] + [2.0 - 0.01 * i for i in range(1, 10)] + [1.9 - 0.3 * i for i in
                                                                     range(1, 6)] + [1.0] * 4
    result = _synthetic(losses)
    assert result.suggestion(burn_in=0) == result.lrs[0]
    steepest = result.suggestion()  # default burn-in: a tenth of the points
    assert steepest == result.lrs[11]  # the start of the steep fall (central difference)
    assert result.suggestion("minimum") == result.lrs[15] / 10  # the lowest loss, 0.4
    # The slope is against log(lr): a loss linear in log(lr) has one constant slope.
    linear_in_log = _synthetic([2 * math.log(lr) for lr in result.lrs])
    assert linear_in_log.slopes() == pytest.approx([2.0] * len(result.lrs))


def test_suggestion_leaves_out_the_diverged_point_and_checks_its_arguments():
    result = _synthetic([3.0, 2.9, 2.8, 2.7, 50.0], diverged=True)
    assert result.suggestion(burn_in=1) in result.lrs[1:4]
    with pytest.raises(ValueError, match="method must be 'steepest' or 'minimum'"):
        result.suggestion("valley")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too few points to suggest an LR"):
        result.suggestion(burn_in=3)
    with pytest.raises(ValueError, match="burn_in must be an int >= 0"):
        result.suggestion(burn_in=-1)


def test_plot_writes_a_file_that_opens(tmp_path):
    from PIL import Image

    result = _synthetic([3.0 - 0.1 * i for i in range(20)])
    path = tmp_path / "lr.png"
    fig = result.plot(path)
    assert fig.axes[0].get_xscale() == "log"
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 100


def test_errors():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="end_lr must be a number above start_lr=1.0.*"
                                         "num_steps must be an int >= 2"):
        tk.find_lr(model, opt, F.mse_loss, [], start_lr=1.0, end_lr=0.5, num_steps=1)
    with pytest.raises(ValueError, match=r"smooth must be a number in \[0, 1\).*diverge"):
        tk.find_lr(model, opt, F.mse_loss, [], smooth=1.0, diverge=1.0)
    with pytest.raises(ValueError, match="start_lr must be a positive number"):
        tk.find_lr(model, opt, F.mse_loss, [], start_lr=0.0)
    with pytest.raises(ValueError, match="find_lr got no batches"):
        tk.find_lr(model, opt, F.mse_loss, [])
