"""Issue 13, the launcher: the first rank to fail is named, with its exit code or signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import torchkit as tk


def _exit_silently_on_rank1() -> None:
    if tk.get_rank() == 1:
        time.sleep(0.5)
        os._exit(3)
    dist.all_reduce(torch.ones(1))  # rank 0 waits in a collective for the dead peer


def _segfault_on_rank1() -> None:
    if tk.get_rank() == 1:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGSEGV)
    dist.all_reduce(torch.ones(1))


def _hang_on_rank1() -> None:
    if tk.get_rank() == 1:
        time.sleep(600)  # stuck outside any collective
    dist.barrier()


@pytest.mark.parametrize("trial", range(3))
def test_a_silent_death_is_the_cause_not_the_peers_connection_reset(trial):
    with pytest.raises(tk.LaunchError, match="rank 1 of 2 exited with code 3") as info:
        tk.launch(_exit_silently_on_rank1, nprocs=2, timeout_s=30)
    assert info.value.rank == 1 and info.value.exitcode == 3


def test_a_segfault_is_named_with_its_signal():
    with pytest.raises(tk.LaunchError, match="rank 1 of 2 was killed by signal SIGSEGV") as info:
        tk.launch(_segfault_on_rank1, nprocs=2, timeout_s=30)
    assert info.value.rank == 1 and info.value.exitcode == -signal.SIGSEGV


def test_a_hung_rank_is_named_not_the_rank_that_timed_out_waiting():
    with pytest.raises(tk.LaunchError, match="rank 1 of 2 hung") as info:
        tk.launch(_hang_on_rank1, nprocs=2, timeout_s=3)
    assert info.value.rank == 1


def test_a_script_without_a_main_guard_is_told_what_to_add(tmp_path: Path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import torchkit as tk

        def work():
            return tk.get_rank()

        print(tk.launch(work, nprocs=2))
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    assert proc.returncode != 0
    assert 'if __name__ == "__main__":' in proc.stderr
    assert "must be picklable" not in proc.stderr


def _evaluate_with_stateful_metrics() -> dict[str, object]:
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    cm = tk.ConfusionMatrix(3)
    trainer = tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy,
                         metrics={"cm": cm, "acc": tk.accuracy}, progress=False)
    result = trainer.evaluate(DataLoader(TensorDataset(x, y), batch_size=4))
    return {"cm": result["val_cm"], "f1": float(cm.f1()), "acc": result["val_acc"]}


def test_stateful_metrics_are_reduced_over_ranks():
    results = tk.launch(_evaluate_with_stateful_metrics, nprocs=2, timeout_s=60)
    torch.manual_seed(0)
    from torch import nn
    model = nn.Linear(4, 3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    cm = tk.ConfusionMatrix(3)
    cm.update(model(x).detach(), y)
    for rank in results:  # every rank: the whole data's matrix, not its own share
        torch.testing.assert_close(rank["cm"], cm.compute(), rtol=0, atol=0)
        assert rank["f1"] == pytest.approx(float(cm.f1()))
        assert int(rank["cm"].sum()) == 30
