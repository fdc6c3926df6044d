"""launch and the rank helpers: results, errors, clean teardown, torchrun, and no-group use."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import torchkit as tk
from torchkit.distributed import _launch

ROOT = Path(__file__).resolve().parent.parent
BOUND_S = 60  # every launch below must return or raise well within this


# --- workers: module-level, so the spawned processes can import them ----------------------


def _square_and_helpers(x: float, *, offset: float) -> dict[str, object]:
    torch.set_num_threads(1)
    rank = tk.get_rank()
    value = torch.tensor([float(rank), x])
    tk.barrier()
    return {
        "rank": rank,
        "world": tk.get_world_size(),
        "main": tk.is_main_process(),
        "env": (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"],
                os.environ["LOCAL_WORLD_SIZE"], os.environ["MASTER_ADDR"]),
        "mean": tk.all_reduce_mean(value),
        "unchanged": value,
        "result": x * x + offset + rank,
    }


def _record_pid(out_dir: str) -> None:
    Path(out_dir, f"pid{tk.get_rank()}").write_text(str(os.getpid()))


def _raise_on_rank1(out_dir: str) -> None:
    torch.set_num_threads(1)
    _record_pid(out_dir)
    if tk.get_rank() == 1:
        raise ValueError("boom from rank 1")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 must then be SIGKILLed
    time.sleep(120)


def _exit_on_rank1(out_dir: str) -> None:
    torch.set_num_threads(1)
    _record_pid(out_dir)
    if tk.get_rank() == 1:
        os._exit(3)
    tk.all_reduce_mean(torch.ones(1))  # waits on the dead peer until terminated
    time.sleep(120)


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _return_unpicklable() -> object:
    return lambda: None


def _identity(x: object) -> object:
    return x


def _child_pids(tmp_path: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(tmp_path.glob("pid*"))]


def _assert_all_gone(pids: list[int]) -> None:
    assert multiprocessing.active_children() == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# --- multi-process ------------------------------------------------------------------------


@pytest.mark.distributed
def test_launch_returns_each_ranks_result_in_order_and_helpers_work():
    results = tk.launch(_square_and_helpers, 3.0, nprocs=2, backend="gloo", offset=0.5)
    assert [r["result"] for r in results] == [9.5, 10.5]
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["world"] for r in results] == [2, 2]
    assert [r["main"] for r in results] == [True, False]
    assert [r["env"] for r in results] == [("0", "0", "2", "2", "127.0.0.1"),
                                           ("1", "1", "2", "2", "127.0.0.1")]
    for r in results:
        torch.testing.assert_close(r["mean"], torch.tensor([0.5, 3.0]))
    assert [r["unchanged"][0].item() for r in results] == [0.0, 1.0]  # not reduced in place
    assert multiprocessing.active_children() == []


@pytest.mark.distributed
def test_a_raising_rank_surfaces_its_traceback_and_no_process_survives(tmp_path):
    start = time.monotonic()
    with pytest.raises(tk.LaunchError, match=r"rank 1 of 2 raised ValueError: boom from rank 1"
                       ) as info:
        tk.launch(_raise_on_rank1, str(tmp_path), nprocs=2, backend="gloo")
    assert time.monotonic() - start < BOUND_S
    message = str(info.value)
    assert 'raise ValueError("boom from rank 1")' in message  # the failing line
    assert "_raise_on_rank1" in message
    assert info.value.rank == 1
    assert info.value.exception_type == "ValueError"
    assert info.value.exitcode is None
    assert "Traceback" in info.value.traceback
    _assert_all_gone(_child_pids(tmp_path))


@pytest.mark.distributed
def test_a_rank_that_dies_silently_is_reported_and_its_stuck_peer_terminated(tmp_path):
    start = time.monotonic()
    with pytest.raises(tk.LaunchError, match=r"rank 1 of 2 exited with code 3 without") as info:
        tk.launch(_exit_on_rank1, str(tmp_path), nprocs=2, backend="gloo")
    assert time.monotonic() - start < BOUND_S
    assert (info.value.rank, info.value.exitcode, info.value.exception_type) == (1, 3, None)
    _assert_all_gone(_child_pids(tmp_path))


@pytest.mark.distributed
def test_a_rank_killed_by_a_signal_is_reported_with_the_signal():
    with pytest.raises(tk.LaunchError, match=r"rank 0 of 1 was killed by signal SIGKILL"):
        tk.launch(_kill_self, nprocs=1, backend="gloo")
    assert multiprocessing.active_children() == []


@pytest.mark.distributed
def test_an_unpicklable_return_value_is_explained():
    with pytest.raises(tk.LaunchError, match=r"TypeError: fn's return value must be picklable"):
        tk.launch(_return_unpicklable, nprocs=1, backend="gloo")
    assert multiprocessing.active_children() == []


@pytest.mark.distributed
def test_a_taken_port_is_retried_with_another(monkeypatch):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    ports = iter([busy.getsockname()[1], _launch._free_port()])
    monkeypatch.setattr(_launch, "_free_port", lambda: next(ports))
    try:
        assert tk.launch(_identity, "ok", nprocs=1, backend="gloo") == ["ok"]
    finally:
        busy.close()
    assert next(ports, "both used") == "both used"


_TORCHRUN_SCRIPT = """
import os, sys
from pathlib import Path
import torchkit as tk

def record(out_dir):
    rank = tk.get_rank()
    with open(Path(out_dir, f"rank{rank}.txt"), "a") as f:
        f.write(f"{os.getpid()} {tk.get_world_size()}\\n")
    tk.barrier()
    return rank

if __name__ == "__main__":
    results = tk.launch(record, sys.argv[1], nprocs=4, backend="gloo")
    Path(sys.argv[2], os.environ["RANK"]).write_text(repr(results))
"""


@pytest.mark.distributed
def test_under_torchrun_fn_runs_once_per_rank_without_spawning(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(_TORCHRUN_SCRIPT))
    out = tmp_path / "out"
    returned = tmp_path / "returned"
    out.mkdir()
    returned.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(out), str(returned)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["rank0.txt", "rank1.txt"]
    for rank in (0, 1):
        lines = (out / f"rank{rank}.txt").read_text().splitlines()
        assert len(lines) == 1  # exactly once, and nprocs=4 spawned nothing
        assert lines[0].endswith(" 2")
    assert [(returned / r).read_text() for r in ("0", "1")] == ["[0]", "[1]"]  # own result


_ORPHAN_SCRIPT = """
import sys, time
import torchkit as tk
from tests.test_distributed import _record_pid

def wait(out_dir):
    _record_pid(out_dir)
    time.sleep(120)

if __name__ == "__main__":
    tk.launch(wait, sys.argv[1], nprocs=2, backend="gloo")
"""


@pytest.mark.distributed
def test_ranks_stop_when_the_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(_ORPHAN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env)
    try:
        deadline = time.monotonic() + BOUND_S
        while len(_child_pids(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = _child_pids(tmp_path)
        assert len(pids) == 2
    finally:
        parent.kill()
        parent.wait(10)
    deadline = time.monotonic() + 15
    while any(_exists(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_exists(pid) for pid in pids)


def _exists(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not yet reaped by its new parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rpartition(")")[2].split()[0] == "Z")


# --- in this process ----------------------------------------------------------------------


def test_helpers_without_a_process_group():
    assert not dist.is_initialized()
    assert (tk.get_rank(), tk.get_world_size(), tk.is_main_process()) == (0, 1, True)
    tk.barrier()
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    assert tk.all_reduce_mean(x) is x


def test_helpers_without_torch_distributed(monkeypatch):
    monkeypatch.setattr(dist, "is_available", lambda: False)
    assert (tk.get_rank(), tk.get_world_size(), tk.is_main_process()) == (0, 1, True)
    tk.barrier()
    x = torch.ones(2)
    assert tk.all_reduce_mean(x) is x
    with pytest.raises(RuntimeError, match=r"launch needs torch.distributed"):
        tk.launch(_identity, 1)


def test_all_reduce_mean_rejects_integer_and_non_tensors():
    with pytest.raises(TypeError, match=r"floating-point tensor .* got dtype torch.int64"):
        tk.all_reduce_mean(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match=r"needs a torch.Tensor, got list"):
        tk.all_reduce_mean([1.0])


@pytest.fixture
def single_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_an_existing_group_runs_fn_here_once(single_process_group):
    assert tk.launch(_identity, os.getpid(), nprocs=8) == [os.getpid()]
    assert dist.is_initialized()  # launch did not create it, so it leaves it alone
    torch.testing.assert_close(tk.all_reduce_mean(torch.tensor([2.0, 4.0])),
                               torch.tensor([2.0, 4.0]))


def test_launcher_environment_initialises_runs_once_and_destroys(monkeypatch):
    port = _launch._free_port()
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    assert tk.launch(_pid_and_world, nprocs=4, backend="gloo") == [(os.getpid(), 1)]
    assert not dist.is_initialized()


def _pid_and_world() -> tuple[int, int]:
    return os.getpid(), tk.get_world_size()


def _outer() -> None:
    def nested() -> None:
        pass

    tk.launch(nested)


def test_fn_must_be_importable_by_the_workers(monkeypatch):
    with pytest.raises(TypeError, match=r"module-level function .* lambdas and nested"):
        tk.launch(lambda: None, nprocs=2)
    with pytest.raises(TypeError, match=r"module-level function .*nested"):
        _outer()
    with pytest.raises(TypeError, match=r"fn must be a callable, got int"):
        tk.launch(3)
    interactive = type(sys)("__main__")  # a REPL's __main__ has no __file__
    monkeypatch.setitem(sys.modules, "__main__", interactive)
    _identity_main = _pid_and_world
    monkeypatch.setattr(_identity_main, "__module__", "__main__")
    with pytest.raises(TypeError, match=r"defined in an interactive session"):
        tk.launch(_identity_main)


def test_arguments_must_be_picklable():
    with pytest.raises(TypeError, match=r"arguments of launch .* must be picklable"):
        tk.launch(_identity, lambda: None, nprocs=1, backend="gloo")
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"nprocs": 0}, ValueError, r"nprocs must be >= 1 or None, got 0"),
        ({"nprocs": 2.0}, TypeError, r"nprocs must be an int or None, got float"),
        ({"nprocs": True}, TypeError, r"nprocs must be an int or None, got bool"),
        ({"backend": "mpi"}, ValueError, r"backend must be one of 'auto', 'gloo', 'nccl', got"),
        ({"timeout_s": 0}, ValueError, r"timeout_s must be a positive number of seconds, got 0"),
        ({"nprocs": -1, "backend": "x"}, ValueError, r"nprocs must be >= 1.*; backend must"),
    ],
)
def test_bad_options_are_rejected(options, error, match):
    with pytest.raises(error, match=match):
        tk.launch(_identity, 1, **options)


def test_nccl_needs_a_gpu_per_process():
    too_many = max(torch.cuda.device_count() + 1, 2)  # on any machine: one more than it has
    with pytest.raises(ValueError, match=r"backend='nccl' needs one CUDA device per process"):
        tk.launch(_identity, 1, nprocs=too_many, backend="nccl")
