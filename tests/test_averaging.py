"""ModelEMA, SWA and update_bn: numbers against torch.optim.swa_utils, Trainer use, resume."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import torchkit as tk


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _data(n: int = 10, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]


def _step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...]) -> None:
    opt.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.step()


def test_ema_matches_torch_averaged_model():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ours = tk.ModelEMA(model, decay=0.9)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    theirs.update_parameters(model)  # its first update copies, as our construction does
    for batch in _data():
        _step(model, opt, batch)
        ours.update(model)
        theirs.update_parameters(model)
    for mine, ref in zip(ours.module.parameters(), theirs.module.parameters()):
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    assert ours.num_updates == 10


def test_ema_warmup_decay_follows_the_closed_form():
    model = nn.Linear(2, 1, bias=False)
    ema = tk.ModelEMA(model, decay=0.5, warmup_steps=3)
    decays = []
    for _ in range(5):
        decays.append(ema.current_decay())
        before = ema.module.weight.clone()
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
        d = decays[-1]
        torch.testing.assert_close(ema.module.weight, d * before + (1 - d) * model.weight)
    assert decays == [min(0.5, (1 + n) / (10 + n)) for n in range(3)] + [0.5, 0.5]
    assert decays[:3] == [0.1, 2 / 11, 3 / 12]


def test_ema_update_every_and_buffers():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = tk.ModelEMA(model, decay=0.5, update_every=2)
    model(torch.randn(8, 3) + 5)  # train mode: BN statistics and num_batches_tracked move
    ema.update(model)
    assert ema.num_updates == 0
    ema.update(model)
    assert ema.num_updates == 1
    bn, avg = model[1], ema.module[1]
    torch.testing.assert_close(avg.running_mean, 0.5 * torch.zeros(3) + 0.5 * bn.running_mean)
    assert avg.num_batches_tracked.item() == 1  # ints are copied, not averaged
    frozen = tk.ModelEMA(model, decay=0.5, include_buffers=False)
    model(torch.randn(8, 3))
    frozen.update(model)
    torch.testing.assert_close(frozen.module[1].running_mean, bn.running_mean, rtol=0, atol=0)


def test_ema_update_has_no_host_sync(monkeypatch):
    model = _net()
    ema = tk.ModelEMA(model, decay=0.99, warmup_steps=10, device="cpu")

    def sync(*_: object) -> None:
        raise AssertionError("host-device sync in ModelEMA.update")

    for name in ("item", "tolist", "__bool__", "__float__", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    ema.update(model)
    monkeypatch.undo()
    assert ema.num_updates == 1
    assert all(p.device.type == "cpu" for p in ema.module.parameters())


def test_swapped_restores_live_weights_bitwise_also_on_exception():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = tk.ModelEMA(model, decay=0.5)
    for batch in _data(3):
        _step(model, opt, batch)
        ema.update(model)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped(model):
        for mine, ref in zip(model.parameters(), ema.module.parameters()):
            assert torch.equal(mine, ref)
    for key, value in model.state_dict().items():
        assert torch.equal(value, live[key])
    with pytest.raises(RuntimeError, match="boom"), ema.swapped(model):
        raise RuntimeError("boom")
    for key, value in model.state_dict().items():
        assert torch.equal(value, live[key])
    tk.ModelEMA(model).copy_to(nn.Sequential(*_net()))  # same names: loads


def test_ema_errors():
    with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\), got 1.0"):
        tk.ModelEMA(nn.Linear(2, 2), decay=1.0)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0.*update_every"):
        tk.ModelEMA(nn.Linear(2, 2), warmup_steps=-1, update_every=0)
    with pytest.raises(TypeError, match="evaluate must be True or False"):
        tk.ModelEMA(nn.Linear(2, 2), evaluate=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device must be a torch device"):
        tk.ModelEMA(nn.Linear(2, 2), device="nowhere")
    with pytest.raises(KeyError, match="model has no"):
        tk.ModelEMA(nn.Linear(2, 2)).update(nn.Sequential(nn.Linear(2, 2)))
    ema = tk.ModelEMA(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="build it from the same model"):
        ema.load_state_dict({"num_updates": 0, "num_calls": 0, "averaged": {"x": torch.ones(1)}})
    with pytest.raises(ValueError, match="start_epoch must be an int >= 0.*update_every_epochs"):
        tk.SWA(nn.Linear(2, 2), start_epoch=-1, update_every_epochs=0)


@given(steps=st.integers(1, 8), cut=st.integers(0, 8), warmup=st.integers(0, 4),
       every=st.integers(1, 3))
def test_ema_state_round_trip_continues_identically(steps, cut, warmup, every):
    cut = min(cut, steps)
    model = nn.Linear(3, 2)
    weights = [torch.randn(2, 3, generator=torch.Generator().manual_seed(i)) for i in range(steps)]
    a = tk.ModelEMA(model, decay=0.8, warmup_steps=warmup, update_every=every)
    b = tk.ModelEMA(nn.Linear(3, 2), decay=0.8, warmup_steps=warmup, update_every=every)
    for i, w in enumerate(weights):
        if i == cut:
            b.load_state_dict(a.state_dict())
        with torch.no_grad():
            model.weight.copy_(w)
        a.update(model)
        if i >= cut:
            b.update(model)
    if cut == steps:
        b.load_state_dict(a.state_dict())
    assert torch.equal(a.module.weight, b.module.weight)
    assert (a.num_updates, a.num_calls) == (b.num_updates, b.num_calls)


def _trainer(model: nn.Module, callbacks: list[tk.Callback], **kwargs: object) -> tk.Trainer:
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    return tk.Trainer(model, opt, F.cross_entropy, callbacks=callbacks, progress=False,
                      **kwargs)  # type: ignore[arg-type]


def test_trainer_updates_once_per_optimizer_step_with_accumulation():
    model = _net()
    ema = tk.ModelEMA(model, decay=0.9)
    trainer = _trainer(model, [ema], accumulate=3)
    trainer.fit(_data(10), epochs=2)  # 4 windows an epoch, the last one flushed
    assert trainer.global_step == 8
    assert ema.num_updates == 8


def test_trainer_evaluates_with_ema_weights_and_keeps_live_ones():
    val = _data(4)
    plain_model = _net()
    plain = _trainer(plain_model, [tk.ModelEMA(plain_model, decay=0.8)])
    plain.fit(_data(6), val, epochs=2)
    model = _net()
    ema = tk.ModelEMA(model, decay=0.8, evaluate=True)
    trainer = _trainer(model, [ema])
    history = trainer.fit(_data(6), val, epochs=2)
    for mine, ref in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(mine, ref)  # evaluation swapped the live weights back
    with torch.no_grad():
        expected = sum(F.cross_entropy(ema.module(x), y) * len(y) for x, y in val) / 32
    assert history["val_loss"][-1] == pytest.approx(float(expected), rel=1e-6)
    assert history["val_loss"][-1] != plain.history["val_loss"][-1]


def test_ema_resumes_bitwise_through_checkpoint_manager(tmp_path):
    def run(**fit: object) -> tuple[nn.Module, tk.ModelEMA]:
        model = _net()
        ema = tk.ModelEMA(model, decay=0.9, warmup_steps=4)
        trainer = _trainer(model, [ema], accumulate=2,
                           checkpoint=tk.CheckpointManager(tmp_path / str(bool(fit))))
        trainer.fit(_data(7), epochs=2, **fit)  # type: ignore[arg-type]
        return model, ema

    straight_model, straight_ema = run()
    _, stopped = run(max_steps=3)  # a planned stop mid-epoch: saved first
    assert stopped.num_updates == 3
    model, ema = run(resume="latest")
    assert ema.num_updates == straight_ema.num_updates == 8
    for a, b in zip([*model.parameters(), *ema.module.parameters()],
                    [*straight_model.parameters(), *straight_ema.module.parameters()]):
        assert torch.equal(a, b)


def test_swa_matches_torch_averaged_model_and_trainer_epochs():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ours, theirs = tk.SWA(model, start_epoch=0), AveragedModel(model)
    for batch in _data(6):
        _step(model, opt, batch)
        ours.update(model)
        theirs.update_parameters(model)
    for mine, ref in zip(ours.module.parameters(), theirs.module.parameters()):
        torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-7)

    model = _net()
    swa = tk.SWA(model, start_epoch=1, update_every_epochs=2)
    _trainer(model, [swa]).fit(_data(3), epochs=5)
    assert (swa.num_updates, swa.last_epoch) == (2, 3)  # epochs 1 and 3


def test_swa_evaluate_includes_the_epoch_being_validated():
    model = _net()
    swa = tk.SWA(model, start_epoch=1, evaluate=True)
    val = _data(2)
    history = _trainer(model, [swa]).fit(_data(3), val, epochs=2)
    assert swa.num_updates == 1  # folded in before validation, not again at epoch end
    with torch.no_grad():
        expected = sum(F.cross_entropy(swa.module(x), y) * len(y) for x, y in val) / 16
    assert history["val_loss"][-1] == pytest.approx(float(expected), rel=1e-6)


def test_swa_resumes_bitwise_through_checkpoint_manager(tmp_path):
    def run(**fit: object) -> tk.SWA:
        model = _net()
        swa = tk.SWA(model, start_epoch=0)
        trainer = _trainer(model, [swa], checkpoint=tk.CheckpointManager(tmp_path / str(bool(fit))))
        trainer.fit(_data(4), epochs=3, **fit)  # type: ignore[arg-type]
        return swa

    straight = run()
    run(max_steps=6)  # stops in epoch 1
    resumed = run(resume="latest")
    assert resumed.num_updates == straight.num_updates == 3
    assert straight.module is not None and resumed.module is not None
    for a, b in zip(resumed.module.parameters(), straight.module.parameters()):
        assert torch.equal(a, b)


def test_update_bn_matches_torch_and_restores_momentum():
    def bn_net() -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.3), nn.ReLU(),
                            nn.Linear(4, 2))
        return net.eval()

    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(16, 3, generator=g) * 3 + 1 for _ in range(5)]
    ours, theirs = bn_net(), bn_net()
    tk.update_bn(ours, [(x, torch.zeros(16)) for x in xs])
    torch.optim.swa_utils.update_bn(xs, theirs)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[key]), key
    # Lightning #14866: a cumulative mean over every batch, not a momentum-weighted one.
    with torch.no_grad():
        features = ours[0](torch.cat(xs))
    torch.testing.assert_close(ours[1].running_mean, features.mean(0), rtol=1e-5, atol=1e-5)
    assert ours[1].momentum == 0.3 and not ours.training
    assert tk.update_bn(nn.Linear(2, 2), []) is not None  # no BatchNorm: nothing to do


def _ddp_and_fsdp(_: object = None) -> list[bool]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank = tk.get_rank()
    data = _data(2)
    model = _net()
    ddp = nn.parallel.DistributedDataParallel(model)
    ema = tk.ModelEMA(ddp, decay=0.5)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    reference = _net()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    ref_ema = tk.ModelEMA(reference, decay=0.5)
    for x, y in data:
        _step(ddp, opt, (x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]))
        ema.update(ddp)
        _step(reference, ref_opt, (x, y))
        ref_ema.update(reference)
    ddp_ok = all(torch.allclose(a, b, atol=1e-6) for a, b in
                 zip(ema.module.parameters(), ref_ema.module.parameters()))
    sharded = _net()
    fully_shard(sharded, mesh=init_device_mesh("cpu", (tk.get_world_size(),)))
    fema = tk.ModelEMA(sharded, decay=0.5)
    with torch.no_grad():
        for p in sharded.parameters():
            p.to_local().fill_(2.0)
    fema.update(sharded)
    local = [p.to_local() for p in sharded.parameters()]
    fsdp_ok = fema.module is None and all(
        a.shape == b.shape and torch.allclose(a, 0.5 * b + 0.5 * 2.0)
        for a, b in zip(fema._averaged, [p.to_local() for p in _shards_of_initial()])
    ) and all(torch.equal(p, torch.full_like(p, 2.0)) for p in local)
    return [ddp_ok, fsdp_ok]


def _shards_of_initial() -> list[torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    net = _net()
    fully_shard(net, mesh=init_device_mesh("cpu", (tk.get_world_size(),)))
    return list(net.parameters())


@pytest.mark.distributed
def test_ema_under_ddp_and_fsdp2_averages_locally():
    results = tk.launch(_ddp_and_fsdp, nprocs=2, backend="gloo")
    assert results == [[True, True], [True, True]]
