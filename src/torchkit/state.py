"""Resumable state: the ``Stateful`` protocol, seeding, and RNG state capture/restore."""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import sys
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["Stateful", "get_rng_state", "loader_generator", "seed_everything", "seed_worker",
           "set_rng_state"]

_log = logging.getLogger(__name__)

_MAX_SEED = 2**32 - 1  # numpy's limit; torch accepts more, but one seed must fit all


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` / ``load_state_dict()``, as torch modules and optimizers.

    torchkit's stateful pieces (``EarlyStopping``, ``GradAccumulator``, ...) return
    state made of plain Python types and tensors only, so a checkpoint holding it loads
    with ``torch.load(..., weights_only=True)``. They save state, never configuration:
    a piece is rebuilt from code and then handed its saved state.

    Example:
        >>> isinstance(tk.EarlyStopping(), tk.Stateful)
        True
        >>> isinstance(nn.Linear(2, 2), tk.Stateful)
        True
        >>> isinstance(object(), tk.Stateful)
        False
    """

    def state_dict(self) -> dict[str, Any]:
        """Return the object's state."""
        ...

    def load_state_dict(self, state_dict: Mapping[str, Any], /) -> Any:
        """Restore the state returned by :meth:`state_dict`."""
        ...


def _numpy(*, imported_only: bool = False) -> Any:
    # numpy is optional and slow to import. Its generator can only have been used if
    # numpy is imported, so capturing needs no import (nor the cost of looking for it).
    module = sys.modules.get("numpy")
    if module is not None or imported_only or importlib.util.find_spec("numpy") is None:
        return module
    import numpy

    return numpy


def seed_everything(seed: int, *, deterministic: bool = False) -> int:
    """Seed python's ``random``, numpy (if installed), torch and every CUDA device.

    Args:
        seed: The seed, an int in ``[0, 2**32 - 1]``.
        deterministic: Also make torch use deterministic algorithms
            (``torch.use_deterministic_algorithms(True)``, cuDNN deterministic and not
            benchmarking, and ``CUBLAS_WORKSPACE_CONFIG`` if unset), so reruns give
            bitwise-equal results at some cost in speed. Ops without a deterministic
            implementation then raise instead of running.

    Returns:
        The seed, for logging.

    Raises:
        ValueError: If ``seed`` is out of range.
        TypeError: If ``seed`` is not an int.

    Example:
        >>> tk.seed_everything(42)
        42
        >>> a = torch.rand(2)
        >>> _ = tk.seed_everything(42)
        >>> torch.equal(a, torch.rand(2))
        True
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**32 - 1], got {seed}")
    random.seed(seed)
    np = _numpy()
    if np is not None:
        np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    os.environ["PYTHONHASHSEED"] = str(seed)  # for worker processes started later
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it is read at CUDA init.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    _log.info("seeded everything with %d (deterministic=%s)", seed, deterministic)
    return seed


def get_rng_state() -> dict[str, Any]:
    """Capture the state of every random number generator torchkit knows.

    Covers python's ``random``, numpy's global generator (if numpy is imported), torch's
    CPU generator and every CUDA device's. The result holds only plain types and
    tensors, so it can go into a checkpoint that loads with ``weights_only=True``.

    Returns:
        A dict with keys ``"python"``, ``"torch"``, ``"cuda"`` and, once numpy has
        been imported, ``"numpy"``.

    Example:
        >>> state = tk.get_rng_state()
        >>> first = torch.rand(3)
        >>> tk.set_rng_state(state)
        >>> torch.equal(first, torch.rand(3))
        True
    """
    state: dict[str, Any] = {
        "python": _python_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    np = _numpy(imported_only=True)
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generator states captured by :func:`get_rng_state`.

    Generators missing from ``state`` are left alone. CUDA states are restored for as
    many devices as both the state and this machine have; a difference is logged.

    Raises:
        KeyError: If ``state`` has no recognised generator at all.

    Example:
        >>> state = tk.get_rng_state()
        >>> import random
        >>> first = random.random()
        >>> tk.set_rng_state(state)
        >>> random.random() == first
        True
    """
    known = {"python", "numpy", "torch", "cuda"}
    if not known & set(state):
        raise KeyError(
            f"set_rng_state expects a state from get_rng_state() with keys among "
            f"{sorted(known)}, got keys {sorted(state)}"
        )
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    cuda_states = list(state.get("cuda", []))
    if cuda_states and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count != len(cuda_states):
            _log.warning(
                "restoring %d saved CUDA RNG states on a machine with %d devices",
                len(cuda_states), count,
            )
        for device, cuda_state in enumerate(cuda_states[:count]):
            torch.cuda.set_rng_state(cuda_state, device)
    np = _numpy()
    if "numpy" in state and np is not None:
        s = state["numpy"]
        keys = s["keys"].numpy().astype("uint32")
        np.random.set_state((s["kind"], keys, s["pos"], s["has_gauss"], s["cached_gaussian"]))


def seed_worker(worker_id: int) -> None:
    """Seed python's ``random`` and numpy in a DataLoader worker from torch's worker seed.

    Pass it as ``DataLoader(..., worker_init_fn=tk.seed_worker)``. torch seeds each
    worker's own generator with ``base_seed + worker_id`` (the base seed drawn from the
    loader's ``generator``), but not ``random`` or numpy: without this, augmentations
    that use them repeat across workers and runs. With :func:`loader_generator` the
    whole data order and augmentation is a function of one seed.

    Args:
        worker_id: The worker's index (given by the DataLoader; unused: torch's
            per-worker seed already includes it).

    Example:
        >>> torch.manual_seed(5)
        <torch._C.Generator object at ...>
        >>> seed_worker(0)
        >>> random.random() == (random.seed(5), random.random())[1]
        True
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np = _numpy(imported_only=True)
    if np is not None:
        np.random.seed(seed)


def loader_generator(seed: int) -> torch.Generator:
    """Return a CPU ``torch.Generator`` seeded with ``seed``, for a DataLoader's shuffle.

    ``DataLoader(data, shuffle=True, generator=tk.loader_generator(0),
    worker_init_fn=tk.seed_worker)`` gives the same order (and worker seeds) in every
    run, whatever else consumed the global RNG before.

    Args:
        seed: An int in ``[0, 2**64)``.

    Returns:
        The seeded generator.

    Raises:
        ValueError: If ``seed`` is not such an int.

    Example:
        >>> torch.randperm(5, generator=loader_generator(0)).tolist()
        [4, 0, 1, 3, 2]
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return torch.Generator().manual_seed(seed)


def _python_state() -> tuple[int, list[int], float | None]:
    version, internal, gauss = random.getstate()
    return version, list(internal), gauss
