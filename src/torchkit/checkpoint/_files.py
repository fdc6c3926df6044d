"""Checkpoint files: atomic, durable save and safe, validated load."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkit._utils import unwrap
from torchkit._version import __version__
from torchkit.state import get_rng_state, set_rng_state

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]  # re-exported by the package

_log = logging.getLogger(__name__)

FORMAT = "torchkit.checkpoint"
FORMAT_VERSION = 1
TMP_MARK = ".tmp-"  # temporary files are ".<name>.tmp-<pid>-<random>"

PathLike = str | os.PathLike[str]
# Exact types: subclasses (a str subclass such as torch.__version__, a defaultdict, a
# namedtuple) are not on torch's weights_only allow-list and would make the file unloadable.
_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_OBJECTS = (torch.Tensor, torch.dtype, torch.device, torch.Size)


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used: missing, truncated, corrupt, foreign or unsafe.

    Attributes:
        path: The file concerned.

    Example:
        >>> try:
        ...     tk.load_checkpoint("no/such/file.pt")
        ... except tk.CheckpointError as error:
        ...     print(error)
        checkpoint no/such/file.pt: no such file
    """

    def __init__(self, path: PathLike, cause: str) -> None:
        super().__init__(f"checkpoint {os.fspath(path)}: {cause}")
        self.path = Path(path)


def _check_plain(value: Any, where: str) -> None:
    """Raise unless ``value`` is made of types that ``weights_only=True`` loads."""
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
    the RNG states (see :func:`get_rng_state`).

    The bytes go to a temporary file in the same directory, which is flushed, fsynced
    and renamed over ``path``; then the directory is fsynced. A crash at any instant
    leaves the old complete file or the new complete file under ``path``, never a mix.

    Args:
        path: Where to write; the parent directory must exist.
        state: Names mapped to stateful objects or plain data.
        step: The optimizer step or iteration the checkpoint was taken at.
        epoch: The epoch the checkpoint was taken in.
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
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of names to objects, got {type(state).__name__}")
    kinds, payload_state = {}, {}
    for name, obj in state.items():
        kind, value = _state_of(name, obj)
        _check_plain(value, f"state[{name!r}]")
        kinds[name], payload_state[name] = kind, value
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "torchkit_version": __version__,
        "torch_version": str(torch.__version__),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "step": step,
        "epoch": epoch,
        "metrics": _metrics(metrics),
        "rng": get_rng_state(),
        "kinds": kinds,
        "state": payload_state,
    }
    return _atomic_save(payload, Path(path), durable=durable, checksum=checksum)


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


def _atomic_save(payload: Any, path: Path, *, durable: bool, checksum: bool = True) -> Path:
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}{os.getpid()}-",
                                    dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # Saving to a path lets torch's C++ writer do the I/O (a Python file object is
        # much slower for big tensors); the file is then reopened only to fsync it.
        with _crc32(checksum):
            torch.save(payload, tmp)
        if durable:
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_directory(directory)
    return path


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable. Windows cannot open a directory; its rename is
    # journaled by NTFS, so there is nothing to do there.
    if os.name == "nt":  # pragma: no cover
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: PathLike, *, map_location: Any = "cpu",
                    mmap: bool = False) -> dict[str, Any]:
    """Load and validate a checkpoint file's payload, or raise ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file" if not path.exists() else "not a file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        # weights_only refuses anything but tensors and plain data: no code has run.
        raise CheckpointError(
            path, f"refused to load: it holds more than tensors and plain data, and loading it "
            f"could run code ({_unpickler_cause(error)})"
        ) from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError,
            IndexError, TypeError, AttributeError, ImportError) as error:
        raise CheckpointError(
            path, f"cannot be read, it is truncated or corrupt ({type(error).__name__}: "
            f"{_first_line(error)})"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(path, "not a torchkit checkpoint (no torchkit format marker)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            path, f"written in format version {version}, newer than this torchkit "
            f"{__version__} reads ({FORMAT_VERSION}); upgrade torchkit"
        )
    missing = {"state", "kinds", "rng", "step", "epoch", "metrics"} - set(payload)
    if missing:
        raise CheckpointError(path, f"incomplete torchkit checkpoint: no {sorted(missing)}")
    return payload


def _unpickler_cause(error: BaseException) -> str:
    for line in str(error).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def metadata(payload: Mapping[str, Any], path: Path) -> dict[str, Any]:
    kinds = payload["kinds"]
    return {
        "path": path,
        "step": payload["step"],
        "epoch": payload["epoch"],
        "metrics": dict(payload["metrics"]),
        "extra": {k: v for k, v in payload["state"].items() if kinds.get(k) == "data"},
        "names": list(payload["state"]),
        "torchkit_version": payload.get("torchkit_version"),
        "torch_version": payload.get("torch_version"),
        "created": payload.get("created"),
        "format_version": payload["format_version"],
    }


def apply_state(payload: Mapping[str, Any], path: Path, state: Mapping[str, Any] | None,
                *, strict: bool, restore_rng: bool) -> None:
    """Hand each object in ``state`` its saved state (strict: every name must be there)."""
    saved = payload["state"]
    state = state or {}
    missing = [name for name in state if name not in saved]
    if missing and strict:
        raise CheckpointError(
            path, f"holds no {', '.join(map(repr, missing))}; it holds "
            f"{', '.join(map(repr, saved)) or 'nothing'} (pass strict=False to skip missing names)"
        )
    for name, obj in state.items():
        if name not in saved:
            _log.warning("checkpoint %s holds no %r; left as it is", path, name)
            continue
        target = unwrap(obj) if isinstance(obj, nn.Module) else obj
        if not callable(getattr(target, "load_state_dict", None)):
            raise TypeError(
                f"state[{name!r}] has no load_state_dict(); plain data saved in a checkpoint "
                "comes back in the returned metadata's 'extra'"
            )
        if isinstance(target, nn.Module):
            target.load_state_dict(saved[name], strict=strict)
        else:
            target.load_state_dict(saved[name])
    if restore_rng:
        set_rng_state(payload["rng"])


def load_checkpoint(
    path: PathLike,
    state: Mapping[str, Any] | None = None,
    *,
    map_location: Any = "cpu",
    strict: bool = True,
    restore_rng: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint safely and hand each object in ``state`` its saved state.

    The file is read with ``torch.load(..., weights_only=True)``: a pickle that would run
    code is refused before anything runs. Models may be wrapped (DDP, ``torch.compile``)
    or not, whichever way they were saved.

    Args:
        path: The checkpoint file.
        state: Names mapped to objects with ``load_state_dict`` (model, optimizer, ...).
        map_location: Where to put the tensors, as for :func:`torch.load`.
        strict: Require every name in ``state`` to be in the file, and models' keys to
            match exactly. With ``False`` missing names are skipped with a warning.
        restore_rng: Also restore the RNG states saved with the checkpoint, so random
            draws continue exactly as they would have after the save.

    Returns:
        The metadata: ``step``, ``epoch``, ``metrics``, ``extra`` (the plain data that
        was saved), ``names`` (everything the file holds), ``path``, the versions that
        wrote it and ``created`` (UTC, ISO 8601).

    Raises:
        CheckpointError: If the file is missing, truncated, corrupt, not a torchkit
            checkpoint, unsafe to unpickle, or (strict) lacks a requested name.

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
    payload = read_checkpoint(path, map_location=map_location)
    apply_state(payload, path, state, strict=strict, restore_rng=restore_rng)
    return metadata(payload, path)
