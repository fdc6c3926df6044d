"""param_groups: per-pattern LRs (first match wins), no_decay, layer_decay, frozen, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchkit as tk


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.Linear(8, 2))


def _where(groups: list[dict]) -> dict[str, tuple[float | None, float]]:
    return {name: (g.get("lr"), g["weight_decay"]) for g in groups for name in g["param_names"]}


def test_first_match_wins_and_no_decay():
    groups = tk.param_groups(_net(), {"3.*": 1e-2, "*.weight": 1e-3}, lr=1e-4,
                             weight_decay=0.1)
    where = _where(groups)
    assert where["3.weight"] == (1e-2, 0.1)
    assert where["3.bias"] == (1e-2, 0.0)
    assert where["0.weight"] == (1e-3, 0.1)
    assert where["1.weight"] == (1e-3, 0.1)  # patterns see names, not types: "1" is a BN
    named = _where(tk.param_groups(_net(), lr=1e-4, weight_decay=0.1, no_decay=("*.bias", "1")))
    assert named["1.weight"] == (1e-4, 0.0)
    assert where["2.bias"] == (1e-4, 0.0)
    assert sum(len(g["params"]) for g in groups) == 8
    opt = torch.optim.AdamW(groups)
    assert [g["name"] for g in opt.param_groups] == [g["name"] for g in groups]
    assert len({g["name"] for g in groups}) == len(groups)


def test_frozen_parameters_are_left_out_and_lr_none_uses_the_optimizer_default():
    net = _net()
    tk.freeze(net, ["0", "1"])
    groups = tk.param_groups(net)
    names = [n for g in groups for n in g["param_names"]]
    assert names == ["2.weight", "2.bias", "3.weight", "3.bias"]
    assert all("lr" not in g for g in groups)
    opt = torch.optim.SGD(groups, lr=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5]


def test_layer_decay_scales_by_depth_from_the_head():
    groups = tk.param_groups(_net(), {"1.*": 0.3}, lr=1.0, layer_decay=0.5)
    where = _where(groups)
    assert where["3.weight"][0] == 1.0
    assert where["2.weight"][0] == 0.5
    assert where["0.bias"][0] == 0.125
    assert where["1.weight"][0] == 0.3  # a pattern's LR is exact


def test_layer_decay_is_applied_in_the_optimizer():
    net = _net()
    opt = torch.optim.SGD(tk.param_groups(net, lr=0.1, layer_decay=0.1), lr=99.0)
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    assert lrs["3.weight"] == pytest.approx(0.1) and lrs["0.weight"] == pytest.approx(1e-4)


def test_report_is_a_readable_table():
    text = repr(tk.param_groups(_net(), {"3.*": 1e-2}, lr=1e-3, weight_decay=0.05))
    lines = text.splitlines()
    assert lines[0].split() == ["group", "params", "lr", "weight_decay"]
    assert "3.*/no_decay" in text and "default" in text
    assert lines[1].split() == ["default", "3", "0.001", "0.05"]


def test_unmatched_and_shadowed_patterns_raise():
    with pytest.raises(ValueError, match=r"'head\.\*' select no trainable parameter"):
        tk.param_groups(_net(), {"head.*": 1e-2})
    with pytest.raises(ValueError, match=r"'3\.weight' select no trainable.*first match wins"):
        tk.param_groups(_net(), {"3.*": 1e-2, "3.weight": 1e-3})
    net = _net()
    tk.freeze(net, "3")
    with pytest.raises(ValueError, match="frozen parameters are left out"):
        tk.param_groups(net, {"3.*": 1e-2})


def test_bad_values_raise():
    with pytest.raises(ValueError, match=r"lrs\['3.\*'\] must be a finite number >= 0"):
        tk.param_groups(_net(), {"3.*": -1.0})
    with pytest.raises(ValueError, match="layer_decay scales lr: pass lr"):
        tk.param_groups(_net(), layer_decay=0.5)
    with pytest.raises(ValueError, match=r"layer_decay must be a number in \(0, 1\]"):
        tk.param_groups(_net(), lr=1.0, layer_decay=2.0)
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        tk.param_groups(_net(), weight_decay=-0.1)
    with pytest.raises(TypeError, match="lrs must map glob patterns"):
        tk.param_groups(_net(), [("3.*", 0.1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="lrs keys must be glob patterns"):
        tk.param_groups(_net(), {3: 0.1})  # type: ignore[dict-item]


def test_unfreeze_adds_a_named_group_beside_named_groups():
    net = _net()
    tk.freeze(net, "0")
    opt = torch.optim.AdamW(tk.param_groups(net, lr=1e-3))
    tk.unfreeze(net, "0", optimizer=opt, lr=1e-4)  # torch refuses unnamed beside named
    assert opt.param_groups[-1]["param_names"] == ["0.weight", "0.bias"]
    assert opt.param_groups[-1]["lr"] == 1e-4
