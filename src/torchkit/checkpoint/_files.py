"""Checkpoint files: atomic, durable, verified save and a safe, validated, honest load."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from torchkit._utils import atomic_write, unwrap
from torchkit._version import __version__
from torchkit.checkpoint._errors import CheckpointError, mismatch
from torchkit.checkpoint._integrity import (
    FORMAT,
    FORMAT_VERSION,
    HashingWriter,
    read_checkpoint,
    trailer,
)
from torchkit.checkpoint._keys import load_module_state
from torchkit.state import get_rng_state, set_rng_state

__all__ = ["load_checkpoint", "save_checkpoint"]  # re-exported by the package

_log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
# Exact types: subclasses (a str subclass such as torch.__version__, a defaultdict, a
# namedtuple) are not on torch's weights_only allow-list and would make the file unloadable.
_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_OBJECTS = (torch.Tensor, torch.dtype, torch.device, torch.Size)


def _check_plain(value: Any, where: str) -> None:
    """Raise unless ``value`` is made of types that ``weights_only=True`` loads."""
    if isinstance(value, torch.Tensor) and is_sharded(value):
        raise CheckpointError(
            where, "is a sharded DTensor (FSDP2 / tensor parallel): one file would hold only "
            "this rank's shard. Save sharded models with CheckpointManager(format='dcp'), "
            "which every rank writes"
        )
    if type(value) in _SCALARS or isinstance(value, _OBJECTS):
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
    elif type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    else:
        raise TypeError(
            f"{where} is a {type(value).__module__}.{type(value).__qualname__}; checkpoints "
            "hold only tensors and plain Python data (None, bool, int, float, str, lists, "
            "tuples, dicts) so they load with torch.load(weights_only=True). Convert it, "
            "e.g. a numpy array with torch.from_numpy"
        )


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a shard of a tensor spread over ranks)."""
    return type(tensor).__name__ == "DTensor" or (
        isinstance(tensor, nn.Parameter) and type(tensor.data).__name__ == "DTensor")


def _state_of(name: str, obj: Any) -> tuple[str, Any]:
    if isinstance(obj, nn.Module):
        return "stateful", unwrap(obj).state_dict()
    if callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict",
                                                                       None)):
        return "stateful", obj.state_dict()
    return "data", obj


def _metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of names to numbers, got {metrics!r}")
    out = {}
    for key, value in metrics.items():
        try:
            out[str(key)] = float(value)  # one host read per value, at checkpoint time only
        except (TypeError, ValueError):
            raise TypeError(f"metrics[{key!r}] must be a number, got {value!r}") from None
    return out


def check_count(value: Any, name: str) -> None:
    """Raise unless ``value`` is ``None`` or an int >= 0 (a step or an epoch)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 0):
        raise ValueError(f"{name} must be an int >= 0 or None, got {value!r}")


def build_payload(state: Mapping[str, Any], *, step: int | None, epoch: int | None,
                  metrics: Mapping[str, Any] | None, seq: int | None = None) -> dict[str, Any]:
    """Check ``state`` and turn it into what a checkpoint file holds."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of names to objects, got {type(state).__name__}")
    check_count(step, "step")
    check_count(epoch, "epoch")
    values = _metrics(metrics)
    kinds, payload_state = {}, {}
    for name, obj in state.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"state names must be non-empty strings, got {name!r}")
        kind, value = _state_of(name, obj)
        _check_plain(value, f"state[{name!r}]")
        kinds[name], payload_state[name] = kind, value
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "torchkit_version": __version__,
        "torch_version": str(torch.__version__),
        "step": step,
        "epoch": epoch,
        "seq": seq,
        "metrics": values,
        "rng": get_rng_state(),
        "kinds": kinds,
        "state": payload_state,
    }


def save_checkpoint(
    path: PathLike,
    state: Mapping[str, Any],
    *,
    step: int | None = None,
    epoch: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    durable: bool = True,
    checksum: bool = False,
) -> Path:
    """Write ``state`` to ``path`` atomically: the file is either complete or untouched.

    Each value of ``state`` is either an object with ``state_dict()`` (a model, an
    optimizer, an LR scheduler, a GradScaler, a torchkit piece), whose state is saved,
    or plain data (numbers, strings, tensors, lists and dicts of them), saved as is.
    Models wrapped in DDP, DataParallel or ``torch.compile`` are saved unwrapped, so
    their keys carry no ``module.`` / ``_orig_mod.`` prefix. The file also records the
    format version, the torchkit and torch versions, ``step``, ``epoch``, ``metrics`` and
    the RNG states (see :func:`get_rng_state`). A sharded model (DTensor parameters,
    FSDP2) is refused: use ``CheckpointManager(format="dcp")``.

    The bytes go to a temporary file in the same directory, followed by a digest of
    them (XXH3-128, computed as they are written), which is flushed, fsynced and renamed
    over ``path``; then the directory is fsynced. A crash at any instant leaves the old
    complete file or the new complete file under ``path``, never a mix; a full disk or
    a read-only directory raises ``OSError`` (errno and path), removes the temporary
    file and leaves ``path`` as it was. The layout is on the checkpoints guide page; the
    file also loads with plain ``torch.load(path, weights_only=True)``.

    Args:
        path: Where to write; the parent directory must exist.
        state: Names mapped to stateful objects or plain data.
        step: The optimizer step or iteration the checkpoint was taken at (int >= 0).
        epoch: The epoch the checkpoint was taken in (int >= 0).
        metrics: Numbers to record (e.g. ``{"val_loss": 0.3}``); tensors are read.
        durable: fsync the file and the directory, so the checkpoint survives a power
            loss, not only a crash of the process. ``False`` is faster and still atomic.
        checksum: Compute the zip CRC-32 of every record. ``torch.load`` never verifies
            it, so it is off by default, which makes saving about 30 % faster (the same
            as ``torch.serialization.set_crc32_options(False)``, for this call only);
            turn it on if other tools (``unzip -t``) must verify the file.

    Returns:
        The path written.

    Raises:
        TypeError: If a value is neither stateful nor plain data, or a metric is not a
            number.
        ValueError: If ``step`` or ``epoch`` is not an int >= 0.
        CheckpointError: If ``state`` holds a sharded (DTensor) tensor.
        OSError: If writing fails; the temporary file is removed and ``path`` untouched.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> model = nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> path = tk.save_checkpoint(folder / "last.pt", {"model": model, "opt": opt,
        ...                           "note": "warm-up done"}, step=100, metrics={"loss": 0.5})
        >>> path.name
        'last.pt'
        >>> meta = tk.load_checkpoint(path, {"model": nn.Linear(2, 1)}, strict=False)
        >>> meta["step"], meta["metrics"], meta["extra"]
        (100, {'loss': 0.5}, {'note': 'warm-up done'})
    """
    payload = build_payload(state, step=step, epoch=epoch, metrics=metrics)
    return write_payload(payload, Path(path), durable=durable, checksum=checksum)


@contextlib.contextmanager
def _crc32(enabled: bool) -> Iterator[None]:
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None:  # torch < 2.6 always computes it
        yield
        return
    before = get()
    torch.serialization.set_crc32_options(enabled)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def write_payload(payload: Any, path: Path, *, durable: bool, checksum: bool = False) -> Path:
    """Write ``payload`` and its digest trailer to ``path`` atomically."""
    writers: list[HashingWriter] = []

    def write(file: IO[Any]) -> None:
        writer = HashingWriter(file)
        writers.append(writer)
        try:
            with _crc32(checksum):
                torch.save(payload, writer)  # type: ignore[arg-type]
        except RuntimeError:
            if writer.error is not None:  # torch hides a failed write (ENOSPC) behind this
                raise writer.error from None
            raise
        file.write(trailer(writer))

    return atomic_write(path, write, durable=durable)


def metadata(payload: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The user-facing description of a loaded checkpoint."""
    kinds = payload["kinds"]
    created = None
    with contextlib.suppress(OSError):
        created = datetime.datetime.fromtimestamp(
            path.stat().st_mtime, datetime.timezone.utc).isoformat()
    return {
        "path": path,
        "step": payload["step"],
        "epoch": payload["epoch"],
        "seq": payload.get("seq"),
        "metrics": dict(payload["metrics"]),
        "extra": {k: v for k, v in payload["state"].items() if kinds.get(k) == "data"},
        "names": list(payload["state"]),
        "torchkit_version": payload.get("torchkit_version"),
        "torch_version": payload.get("torch_version"),
        "created": payload.get("created", created),
        "format_version": payload["format_version"],
    }


def apply_state(payload: Mapping[str, Any], path: Path, state: Mapping[str, Any] | None,
                *, strict: bool, restore_rng: bool) -> None:
    """Hand each object in ``state`` its saved state (strict: every name must be there)."""
    saved = payload["state"]
    state = state or {}
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of names to objects, got {type(state).__name__}")
    missing = [name for name in state if name not in saved]
    if missing and strict:
        raise CheckpointError(
            path, f"holds no {', '.join(map(repr, missing))}; it holds "
            f"{', '.join(map(repr, saved)) or 'nothing'} (pass strict=False to skip missing names)"
        )
    for name, obj in state.items():
        if name not in saved:
            warnings.warn(f"checkpoint {path} holds no {name!r}; left as it is",
                          UserWarning, stacklevel=3)
            continue
        target = unwrap(obj) if isinstance(obj, nn.Module) else obj
        if not callable(getattr(target, "load_state_dict", None)):
            raise TypeError(
                f"state[{name!r}] has no load_state_dict(); plain data saved in a checkpoint "
                "comes back in the returned metadata's 'extra'"
            )
        if isinstance(target, nn.Module):
            load_module_state(target, saved[name], strict=strict, path=path, name=name)
            continue
        try:
            target.load_state_dict(saved[name])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as error:
            cause = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise mismatch(path, f"state[{name!r}] does not load into the "
                           f"{type(target).__name__}: {cause}", error) from error
    if restore_rng:
        set_rng_state(payload["rng"])


def load_checkpoint(
    path: PathLike,
    state: Mapping[str, Any] | None = None,
    *,
    map_location: Any = "cpu",
    strict: bool = True,
    restore_rng: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint safely and hand each object in ``state`` its saved state.

    The file's digest is checked first, so a single flipped bit is reported, never
    loaded. Its records are checked next (a compressed record, or one claiming more
    bytes than the file holds, is refused before anything is allocated), then it is
    read with ``torch.load(..., weights_only=True)``: a pickle that would run code is
    refused before anything runs. Models may be wrapped (DDP, ``torch.compile``) or
    not, whichever way they were saved; a ``module.`` / ``_orig_mod.`` prefix in the
    file is removed, and a pruned model's checkpoint re-creates its pruning masks in a
    freshly built model (:func:`~torchkit.restore_pruning`).

    Args:
        path: The checkpoint file.
        state: Names mapped to objects with ``load_state_dict`` (model, optimizer, ...).
        map_location: Where to put the tensors, as for :func:`torch.load`.
        strict: Require every name in ``state`` to be in the file (the file may hold
            more) and models' keys and shapes to match exactly; a mismatch raises
            ``CheckpointError`` listing the missing and unexpected keys. With ``False``
            what matches is loaded and a warning lists everything that did not.
        restore_rng: Also restore the RNG states saved with the checkpoint, so random
            draws continue exactly as they would have after the save.
        verify: Check the file's digest (default). ``False`` skips it: only for a file
            you know is intact and want to read a little faster, or to salvage what a
            damaged file still holds.

    Returns:
        The metadata: ``step``, ``epoch``, ``metrics``, ``extra`` (the plain data that
        was saved), ``names`` (everything the file holds), ``path``, the versions that
        wrote it and ``created`` (UTC, ISO 8601).

    Raises:
        CheckpointError: If the file is missing, truncated, corrupt (digest mismatch),
            not a torchkit checkpoint, unsafe to unpickle or to allocate, or (strict)
            lacks a requested name or does not fit an object.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "ckpt.pt"
        >>> _ = tk.save_checkpoint(path, {"model": nn.Linear(2, 1)}, epoch=3)
        >>> tk.load_checkpoint(path, {"model": nn.Linear(2, 1)})["epoch"]
        3
        >>> try:
        ...     tk.load_checkpoint(path, {"model": nn.Linear(2, 1), "optimizer": None})
        ... except tk.CheckpointError as error:
        ...     print(error)
        checkpoint ...ckpt.pt: holds no 'optimizer'; it holds 'model' (pass strict=False ...)
    """
    path = Path(path)
    payload = read_checkpoint(path, map_location=map_location, verify=verify)
    apply_state(payload, path, state, strict=strict, restore_rng=restore_rng)
    return metadata(payload, path)
