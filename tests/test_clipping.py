"""Clipping helpers: agreement with torch, bounds for every norm, AMP unscaling once."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import torchkit as tk
from tests.conftest import make_model


def params_with_grads(seed: int, scale: float = 1.0, dtypes=(torch.float32,)) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3,), (2, 2, 3), (5,)]
    params = []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        p = nn.Parameter(torch.randn(shape, generator=g, dtype=dtype))
        p.grad = torch.randn(shape, generator=g, dtype=dtype) * scale
        params.append(p)
    return params


def clone(params: list[nn.Parameter]) -> list[nn.Parameter]:
    out = []
    for p in params:
        q = nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


norm_types = st.sampled_from([1.0, 2.0, 3.0, math.inf])


@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3), max_norm=st.floats(0.01, 100),
       norm_type=norm_types)
def test_clip_grad_norm_matches_torch_and_bounds_the_norm(seed, scale, max_norm, norm_type):
    ours, theirs = params_with_grads(seed, scale), params_with_grads(seed, scale)
    total = tk.clip_grad_norm(ours, max_norm, norm_type=norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type=norm_type)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close([p.grad for p in ours], [p.grad for p in theirs])
    after = tk.grad_norm(ours, norm_type=norm_type)
    assert after <= max_norm * (1 + 1e-5)
    if total <= max_norm:  # small gradients are left alone
        torch.testing.assert_close([p.grad for p in ours], [p.grad for p in params_with_grads(
            seed, scale)], rtol=1e-6, atol=0)


@given(seed=st.integers(0, 10_000), norm_type=norm_types)
def test_grad_norm_matches_torch_and_changes_nothing(seed, norm_type):
    params = params_with_grads(seed)
    before = [p.grad.clone() for p in params]
    expected = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
    torch.testing.assert_close(tk.grad_norm(params, norm_type=norm_type), expected)
    torch.testing.assert_close([p.grad for p in params], before, rtol=0, atol=0)


def test_mixed_dtypes_are_grouped():
    params = params_with_grads(0, dtypes=(torch.float32, torch.float64))
    expected_params = clone(params)
    total = tk.clip_grad_norm(params, 0.5)
    expected = torch.nn.utils.clip_grad_norm_(expected_params, 0.5)
    torch.testing.assert_close(total, expected)  # float64, as torch (issue 13)
    for p, q in zip(params, expected_params):
        assert p.grad.dtype == q.grad.dtype
        torch.testing.assert_close(p.grad, q.grad)


def test_single_tensor_and_parameters_without_grads():
    p = nn.Parameter(torch.ones(2))
    assert tk.grad_norm(p) == 0.0
    assert tk.clip_grad_norm([p], 1.0) == 0.0
    tk.clip_grad_value(p, 1.0)  # nothing to clip: no error
    p.grad = torch.tensor([3.0, 4.0])
    assert tk.clip_grad_norm(p, 1.0) == 5.0
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8]))


def test_generators_are_consumed_once():
    model = make_model()
    model(torch.randn(4, 6)).sum().backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    torch.testing.assert_close(tk.clip_grad_norm(model.parameters(), 1e9), expected)


def test_nonfinite_norm():
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, math.inf])
    assert math.isinf(tk.clip_grad_norm([p], 1.0))
    p.grad = torch.tensor([1.0, math.nan])
    with pytest.raises(RuntimeError, match="order 2.0 of the gradients is nan"):
        tk.clip_grad_norm([p], 1.0, error_if_nonfinite=True)


def scaled_setup(scale: float = 2.0**8):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    scaler.scale(model(x).square().mean()).backward()
    return model, opt, scaler


def test_clip_grad_norm_unscales_once_through_the_scaler():
    model, opt, scaler = scaled_setup()
    reference, ref_opt, _ = scaled_setup(scale=1.0)
    total = tk.clip_grad_norm(model.parameters(), 0.1, scaler=scaler, optimizer=opt)
    again = tk.clip_grad_norm(model.parameters(), 0.1, scaler=scaler, optimizer=opt)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    torch.testing.assert_close(total, expected)
    assert again <= 0.1 * (1 + 1e-5)  # already unscaled and clipped: not divided twice
    scaler.step(opt)  # still works after our unscale_
    scaler.update()
    ref_opt.step()
    torch.testing.assert_close(dict(model.named_parameters()),
                               dict(reference.named_parameters()))


def test_user_unscale_then_clip_does_not_raise():
    model, opt, scaler = scaled_setup()
    scaler.unscale_(opt)
    grads = [p.grad.clone() for p in model.parameters()]
    tk.clip_grad_norm(model.parameters(), 1e9, scaler=scaler, optimizer=opt)
    torch.testing.assert_close([p.grad for p in model.parameters()], grads)


@given(seed=st.integers(0, 10_000), clip_value=st.floats(0.01, 3))
def test_clip_grad_value_matches_torch(seed, clip_value):
    ours, theirs = params_with_grads(seed), params_with_grads(seed)
    tk.clip_grad_value(ours, clip_value)
    torch.nn.utils.clip_grad_value_(theirs, clip_value)
    torch.testing.assert_close([p.grad for p in ours], [p.grad for p in theirs], rtol=0, atol=0)
    assert max(p.grad.abs().max() for p in ours) <= clip_value


def test_clip_grad_value_with_scaler():
    model, opt, scaler = scaled_setup()
    reference, _, _ = scaled_setup(scale=1.0)
    tk.clip_grad_value(model.parameters(), 0.01, scaler=scaler, optimizer=opt)
    torch.nn.utils.clip_grad_value_(reference.parameters(), 0.01)
    torch.testing.assert_close([p.grad for p in model.parameters()],
                               [p.grad for p in reference.parameters()])


def agc_reference(p: torch.Tensor, grad: torch.Tensor, clip_factor: float, eps: float):
    """Unit-wise AGC written out per unit, as in the NFNet paper."""
    out = grad.clone()
    units = [(slice(None),)] if p.ndim <= 1 else [(i,) for i in range(p.shape[0])]
    for unit in units:
        w_norm = max(p[unit].norm().item(), eps)
        g_norm = grad[unit].norm().item()
        if g_norm > clip_factor * w_norm:
            out[unit] = grad[unit] * (clip_factor * w_norm / g_norm)
    return out


@given(seed=st.integers(0, 10_000), clip_factor=st.sampled_from([0.001, 0.01, 0.1, 1.0]),
       scale=st.floats(1e-4, 10))
def test_clip_grad_adaptive_matches_the_unitwise_rule(seed, clip_factor, scale):
    params = params_with_grads(seed, scale)
    params.append(nn.Parameter(torch.zeros(3, 2)))  # zero weights: eps floor applies
    params[-1].grad = torch.ones(3, 2)
    expected = [agc_reference(p.detach(), p.grad, clip_factor, 1e-3) for p in params]
    tk.clip_grad_adaptive(params, clip_factor)
    torch.testing.assert_close([p.grad for p in params], expected, rtol=1e-4, atol=1e-7)
    for p in params:
        dims = tuple(range(1, p.ndim))
        g = p.grad.norm(dim=dims) if dims else p.grad.norm()
        w = (p.detach().norm(dim=dims) if dims else p.detach().norm()).clamp(min=1e-3)
        assert (g <= clip_factor * w * (1 + 1e-5)).all()


def test_clip_grad_adaptive_on_conv_weights_with_scaler():
    conv = nn.Conv2d(2, 4, 3)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    scaler.scale(conv(torch.randn(2, 2, 5, 5)).square().sum()).backward()
    unscaled = [p.grad / 64.0 for p in conv.parameters()]
    expected = [agc_reference(p.detach(), g, 0.01, 1e-3)
                for p, g in zip(conv.parameters(), unscaled)]
    tk.clip_grad_adaptive(conv.parameters(), 0.01, scaler=scaler, optimizer=opt)
    torch.testing.assert_close([p.grad for p in conv.parameters()], expected, rtol=1e-4,
                               atol=1e-7)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda ps: tk.clip_grad_norm(ps, 0.0), ValueError, "max_norm must be positive, got 0.0"),
        (lambda ps: tk.clip_grad_norm(ps, 1.0, norm_type=0), ValueError,
         "norm_type must be a positive number or inf, got 0.0"),
        (lambda ps: tk.grad_norm(ps, norm_type=-2), ValueError, "norm_type must be a positive"),
        (lambda ps: tk.clip_grad_norm(ps, 1.0, norm_type=math.nan), ValueError,
         "norm_type must be a positive number or inf, got nan"),
        (lambda ps: tk.clip_grad_value(ps, -1), ValueError, "clip_value must be positive, got -1"),
        (lambda ps: tk.clip_grad_adaptive(ps, 0), ValueError,
         "clip_factor must be positive, got 0"),
        (lambda ps: tk.clip_grad_adaptive(ps, eps=-1.0), ValueError,
         "eps must be non-negative, got -1.0"),
        (lambda ps: tk.clip_grad_norm(ps, 1.0, scaler=torch.amp.GradScaler("cpu")), ValueError,
         "scaler was given without optimizer"),
        (lambda ps: tk.clip_grad_value(ps, 1.0, optimizer=torch.optim.SGD(ps, lr=1)), ValueError,
         "optimizer is only used together with scaler"),
        (lambda ps: tk.clip_grad_norm([*ps, "w"], 1.0), TypeError,
         "parameters must be tensors, got an item of type str"),
        (lambda ps: tk.clip_grad_adaptive([*ps, 3], 1.0), TypeError,
         "parameters must be tensors, got an item of type int"),
    ],
)
def test_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call(params_with_grads(0))
