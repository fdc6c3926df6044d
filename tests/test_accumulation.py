"""GradAccumulator: exact big-batch equivalence, step order, skipping, state and DDP."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import torchkit as tk
from tests.conftest import make_model


def data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(
        n, 3, generator=g, dtype=torch.float64
    )


def big_batch_run(windows, *, opt_cls=torch.optim.SGD, max_norm=None, **opt_kwargs):
    """One optimizer step per window on the concatenated window: the ground truth."""
    model = make_model(torch.float64)
    opt = opt_cls(model.parameters(), **opt_kwargs)
    for window in windows:
        x = torch.cat([b[0] for b in window])
        y = torch.cat([b[1] for b in window])
        F.mse_loss(model(x), y).backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad()
    return model


def accumulated_run(batches, steps, *, opt_cls=torch.optim.SGD, weighted=True, **kwargs):
    opt_kwargs = {k: v for k, v in kwargs.items() if k in ("lr", "momentum", "weight_decay")}
    accum_kwargs = {k: v for k, v in kwargs.items() if k not in opt_kwargs}
    model = make_model(torch.float64)
    opt = opt_cls(model.parameters(), **opt_kwargs)
    accum = tk.GradAccumulator(opt, steps, **accum_kwargs)
    stepped = []
    for x, y in batches:
        with accum.accumulate():
            loss = F.mse_loss(model(x), y)
        stepped.append(accum.backward(loss, batch_size=len(x) if weighted else None))
    stepped.append(accum.flush())
    return model, accum, stepped


def windows_of(batches, steps):
    return [batches[i : i + steps] for i in range(0, len(batches), steps)]


def roundtrip(state):
    """Serialise and load back, as a checkpoint would, so nothing is shared."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same_params(a: nn.Module, b: nn.Module, **tol) -> None:
    torch.testing.assert_close(dict(a.named_parameters()), dict(b.named_parameters()), **tol)


@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=9),
    steps=st.integers(1, 4),
    max_norm=st.sampled_from([None, 0.05, 10.0]),
    opt=st.sampled_from(["sgd", "adam"]),
)
def test_equals_one_big_batch_step_per_window(sizes, steps, max_norm, opt):
    """Uneven micro-batches and a short last window still give the big-batch update."""
    batches = [data(n, seed=i) for i, n in enumerate(sizes)]
    opt_cls, lr = (torch.optim.SGD, 0.1) if opt == "sgd" else (torch.optim.Adam, 0.01)
    expected = big_batch_run(windows_of(batches, steps), opt_cls=opt_cls, lr=lr, max_norm=max_norm)
    got, accum, stepped = accumulated_run(
        batches, steps, opt_cls=opt_cls, lr=lr, max_norm=max_norm
    )
    assert_same_params(got, expected)
    assert accum.num_steps == math.ceil(len(sizes) / steps)
    assert sum(stepped) == accum.num_steps
    assert accum.micro_step == 0


def test_equal_weights_without_batch_size():
    """Without batch_size, the window's gradient is the plain mean of the micro-losses."""
    batches = [data(4, seed=i) for i in range(3)]
    got, _, _ = accumulated_run(batches, 3, weighted=False, lr=0.1)
    expected = make_model(torch.float64)
    opt = torch.optim.SGD(expected.parameters(), lr=0.1)
    sum(F.mse_loss(expected(x), y) for x, y in batches).div(3).backward()
    opt.step()
    assert_same_params(got, expected)


def test_naive_division_would_be_wrong():
    """The case the exactness contract exists for: uneven sizes differ from loss/steps."""
    batches = [data(8, seed=0), data(1, seed=1)]
    expected = big_batch_run([batches], lr=0.1)
    unweighted, _, _ = accumulated_run(batches, 2, weighted=False, lr=0.1)
    weighted, _, _ = accumulated_run(batches, 2, lr=0.1)
    assert_same_params(weighted, expected)
    with pytest.raises(AssertionError):
        assert_same_params(unweighted, expected)


def test_returns_true_only_at_boundaries():
    _, accum, stepped = accumulated_run([data(2, seed=i) for i in range(5)], 2, lr=0.1)
    assert stepped == [False, True, False, True, False, True]  # the last is flush()
    assert accum.flush() is False


def test_loss_drops_on_a_learnable_task():
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = x @ torch.randn(6, 3)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    accum = tk.GradAccumulator(torch.optim.Adam(model.parameters(), lr=0.01), 4, max_norm=1.0)
    first = F.mse_loss(model(x), y).item()
    for _ in range(30):
        for xb, yb in zip(x.split(32), y.split(32)):
            with accum.accumulate():
                loss = F.mse_loss(model(xb), yb)
            accum.backward(loss, batch_size=len(xb))
    assert F.mse_loss(model(x), y).item() < 0.1 * first
    assert accum.num_steps == 60
    assert accum.last_grad_norm is not None and accum.last_grad_norm.ndim == 0


class Recorder:
    def __init__(self):
        self.events: list[str] = []


def test_boundary_order_with_a_scaler(monkeypatch):
    rec = Recorder()

    class Scaler(torch.amp.GradScaler):
        def unscale_(self, optimizer):
            rec.events.append("unscale")
            return super().unscale_(optimizer)

        def step(self, optimizer, *args, **kwargs):
            rec.events.append("scaler.step")
            return super().step(optimizer, *args, **kwargs)

        def update(self, new_scale=None):
            rec.events.append("update")
            return super().update(new_scale)

    class SGD(torch.optim.SGD):
        def step(self, closure=None):
            rec.events.append("optimizer.step")
            return super().step(closure)

        def zero_grad(self, set_to_none=True):
            rec.events.append(f"zero_grad(set_to_none={set_to_none})")
            return super().zero_grad(set_to_none)

    import torchkit._grads as grads
    import torchkit.accumulation as accumulation

    real_normalise = grads.unscale_and_check
    real_clip = accumulation.clip_grad_norm

    def normalise(*args, **kwargs):
        rec.events.append("normalise")
        return real_normalise(*args, **kwargs)

    def clip(*args, **kwargs):
        rec.events.append("clip")
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(grads, "unscale_and_check", normalise)  # NonFiniteFlag.check's
    monkeypatch.setattr(accumulation, "clip_grad_norm", clip)
    model = make_model()
    accum = tk.GradAccumulator(
        SGD(model.parameters(), lr=0.1), 2, scaler=Scaler("cpu"), max_norm=1.0
    )
    for i in range(2):
        with accum.accumulate():
            loss = model(torch.randn(4, 6)).square().mean()
        accum.backward(loss)
        assert rec.events == ([] if i == 0 else rec.events)
    assert rec.events == [
        "unscale", "normalise", "clip", "scaler.step", "optimizer.step", "update",
        "zero_grad(set_to_none=True)",
    ]
    assert all(p.grad is None for p in model.parameters())


def test_scaler_gives_the_same_update_as_full_precision():
    """A CPU GradScaler (power-of-two scale) must not change the result."""
    batches = [data(n, seed=i) for i, n in enumerate([3, 5, 2])]
    plain, _, _ = accumulated_run(batches, 2, lr=0.1, max_norm=0.1)
    scaled, accum, _ = accumulated_run(
        batches, 2, lr=0.1, max_norm=0.1, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10)
    )
    assert_same_params(scaled, plain)
    assert accum.skipped_steps == 0


def nan_window_run(scaler=None, skip_nonfinite=True):
    model = make_model(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    accum = tk.GradAccumulator(opt, 2, scaler=scaler, skip_nonfinite=skip_nonfinite)
    x, y = data(4, seed=0)
    results = []
    for poison in [False, True, False, False]:
        with accum.accumulate():
            loss = F.mse_loss(model(x), y)
        results.append(accum.backward(loss * math.nan if poison else loss))
    return model, accum, results, (x, y)


@pytest.mark.parametrize("use_scaler", [False, True])
def test_nonfinite_window_is_skipped_and_does_not_leak(use_scaler):
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0) if use_scaler else None
    model, accum, results, (x, y) = nan_window_run(scaler)
    assert results == [False, False, False, True]
    assert accum.skipped_steps == 1 and accum.num_steps == 2
    # Only the clean second window may have touched the weights (and momentum).
    expected = make_model(torch.float64)
    opt = torch.optim.SGD(expected.parameters(), lr=0.1, momentum=0.9)
    (2 * F.mse_loss(expected(x), y) / 2).backward()
    opt.step()
    assert_same_params(model, expected)
    if use_scaler:
        assert scaler.get_scale() == 2.0  # backed off once


def test_skip_nonfinite_false_applies_the_step():
    model, accum, results, _ = nan_window_run(skip_nonfinite=False)
    assert results == [False, True, False, True]
    assert accum.skipped_steps == 0
    assert torch.isnan(next(model.parameters())).all()


@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_resume_from_state_dict_mid_window_is_exact(split):
    """Save after `split` micro-batches (mid-window too), load into fresh objects, go on."""
    batches = [data(n, seed=i) for i, n in enumerate([3, 4, 5, 2, 6, 1, 3])]
    straight, _, _ = accumulated_run(batches, 3, lr=0.1, momentum=0.9)

    def build():
        model = make_model(torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, opt, tk.GradAccumulator(opt, 3)

    def feed(model, accum, part):
        for x, y in part:
            with accum.accumulate():
                loss = F.mse_loss(model(x), y)
            accum.backward(loss, batch_size=len(x))

    model, opt, accum = build()
    feed(model, accum, batches[:split])
    saved = roundtrip(
        {"model": model.state_dict(), "opt": opt.state_dict(), "accum": accum.state_dict()}
    )
    model, opt, accum = build()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    accum.load_state_dict(saved["accum"])
    assert accum.micro_step == split % 3
    feed(model, accum, batches[split:])
    accum.flush()
    assert_same_params(model, straight, rtol=0, atol=0)


@given(sizes=st.lists(st.integers(1, 5), min_size=2, max_size=8), steps=st.integers(1, 3))
def test_state_round_trip_does_not_change_decisions(sizes, steps):
    batches = [data(n, seed=i) for i, n in enumerate(sizes)]
    model_a = make_model(torch.float64)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1, momentum=0.5)
    a = tk.GradAccumulator(opt_a, steps)
    half = len(batches) // 2
    for x, y in batches[:half]:
        a.backward(F.mse_loss(model_a(x), y), batch_size=len(x))
    model_b = make_model(torch.float64)
    model_b.load_state_dict(roundtrip(model_a.state_dict()))
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.5)
    opt_b.load_state_dict(roundtrip(opt_a.state_dict()))
    b = tk.GradAccumulator(opt_b, steps)
    b.load_state_dict(roundtrip(a.state_dict()))
    rest = batches[half:]
    assert [a.backward(F.mse_loss(model_a(x), y), batch_size=len(x)) for x, y in rest] == [
        b.backward(F.mse_loss(model_b(x), y), batch_size=len(x)) for x, y in rest
    ]
    assert a.flush() == b.flush()
    assert_same_params(model_a, model_b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"steps": 0}, ValueError, "steps must be an int >= 1, got 0"),
        ({"steps": 2.0}, ValueError, "steps must be an int >= 1, got 2.0"),
        ({"steps": 2, "max_norm": 0}, ValueError, "max_norm must be a positive number or None"),
        ({"steps": 2, "norm_type": -1}, ValueError, "norm_type must be a positive number"),
        ({"steps": 2, "model": "net"}, TypeError, "model must be an nn.Module or None, got str"),
        ({"steps": 2, "scaler": object()}, TypeError, "scaler must be a torch.amp.GradScaler"),
    ],
)
def test_bad_config(kwargs, error, message):
    opt = torch.optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.raises(error, match=message):
        tk.GradAccumulator(opt, **kwargs)


def test_bad_config_reports_every_problem_at_once():
    opt = torch.optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="steps must.*; max_norm must"):
        tk.GradAccumulator(opt, 0, max_norm=-1.0)


def test_optimizer_type_is_checked():
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        tk.GradAccumulator(make_model(), 2)


def test_bad_backward_arguments():
    model = make_model()
    accum = tk.GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), 3)
    out = model(torch.randn(4, 6))
    with pytest.raises(TypeError, match="loss must be a tensor, got float"):
        accum.backward(1.0)
    with pytest.raises(ValueError, match=r"loss must be a scalar .* got shape \(4, 3\)"):
        accum.backward(out)
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        accum.backward(out.mean(), batch_size=0)
    with pytest.raises(TypeError, match="batch_size must be an int or None, got 2.5"):
        accum.backward(out.mean(), batch_size=2.5)
    accum.backward(out.mean(), batch_size=4)
    with pytest.raises(ValueError, match="for every micro-batch of a window or for none"):
        accum.backward(model(torch.randn(4, 6)).mean())


def test_load_state_dict_checks_keys_and_shapes():
    model = make_model()
    accum = tk.GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), 3)
    accum.backward(model(torch.randn(4, 6)).mean())
    state = accum.state_dict()
    with pytest.raises(KeyError, match=r"missing keys \['grads'\]"):
        accum.load_state_dict({k: v for k, v in state.items() if k != "grads"})
    other = nn.Linear(6, 3)
    with pytest.raises(ValueError, match="gradients for 4 parameters but the optimizer has 2"):
        tk.GradAccumulator(torch.optim.SGD(other.parameters(), lr=0.1), 3).load_state_dict(state)
    swapped = dict(state, grads=[state["grads"][1], *state["grads"][1:]])
    with pytest.raises(ValueError, match=r"gradient 0 in the state has shape \(8,\)"):
        accum.load_state_dict(swapped)


def test_state_is_progress_only():
    accum = tk.GradAccumulator(torch.optim.SGD(make_model().parameters(), lr=0.1), 4)
    state = accum.state_dict()
    assert state["grads"] is None  # at a boundary nothing is pending
    assert "steps" not in state and "max_norm" not in state
    assert repr(accum) == "GradAccumulator(steps=4, max_norm=None, num_steps=0, micro_step=0)"


# --- DDP: two real processes on gloo -------------------------------------------------

DDP_SIZES = {0: [3, 5, 2], 1: [4, 1, 6]}  # per rank; steps=2 leaves a short last window


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = DDP(make_model(torch.float64))
        fired: list[int] = []
        micro = [0]

        def hook(state, bucket):
            fired.append(micro[0])
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, hook)
        accum = tk.GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
        for i, n in enumerate(DDP_SIZES[rank]):
            micro[0] = i
            x, y = data(n, seed=10 * rank + i)
            with accum.accumulate():
                loss = F.mse_loss(model(x), y)
            accum.backward(loss, batch_size=n)
        accum.flush()
        torch.save(
            {"params": dict(model.module.named_parameters()), "fired": fired},
            f"{out_dir}/rank{rank}.pt",
        )
        dist.barrier()  # gloo aborts a rank that tears the group down under its peer
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_ddp_skips_all_reduce_inside_a_window_and_equals_the_global_big_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    windows = [
        [data(n, seed=10 * r + i) for r in (0, 1) for i, n in enumerate(DDP_SIZES[r]) if i < 2],
        [data(n, seed=10 * r + 2) for r in (0, 1) for n in DDP_SIZES[r][2:]],
    ]
    expected = big_batch_run(windows, lr=0.1)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        # Only the window-closing micro-batch 1 all-reduces; micro-batch 2 is synced by flush.
        assert result["fired"] == [1]
        torch.testing.assert_close(result["params"], dict(expected.named_parameters()))


def test_float64_windows_are_normalised_in_float64():
    """A float32 reciprocal would leave ~1e-9 relative error in float64 gradients."""
    batches = [data(n, seed=i) for i, n in enumerate([3, 4])]
    expected = big_batch_run([batches], lr=0.1)
    got, _, _ = accumulated_run(batches, 2, lr=0.1)
    assert_same_params(got, expected, rtol=1e-14, atol=1e-15)


def test_the_model_can_be_set_again_between_windows_only():
    model = make_model()
    accum = tk.GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
    with pytest.raises(TypeError, match="model must be an nn.Module or None, got str"):
        accum.model = "model"
    with accum.accumulate():
        loss = model(torch.randn(4, 6)).square().mean()
    accum.backward(loss)
    with pytest.raises(RuntimeError, match=r"model set inside a window \(1 micro-batches"):
        accum.model = None
    assert accum.model is model
    accum.flush()
    accum.model = None
    assert accum.model is None
