"""Sharded checkpoints: one directory per save written with torch.distributed.checkpoint.

Layout of ``<prefix>-<step>/``: the DCP files (``.metadata``, ``__<rank>_0.distcp``) hold
only the *tensors* of the models and optimizers (sharded DTensors stay sharded), and
``torchkit.pt``, an ordinary digest-verified torchkit checkpoint written by rank 0, holds
everything else: the non-tensor parts of those states (tensor leaves replaced by
references into the DCP files), every other piece's state, the metadata and each rank's
RNG state. Nothing in the directory is unpickled with code execution: ``torchkit.pt`` loads
with ``weights_only=True``; DCP's ``.metadata`` (which torch reads with a plain
``pickle.load``) is read here with an unpickler that admits only DCP's own metadata
classes; DCP's byte items (which torch reads with ``weights_only=False``) are never
written, and refused on load; the data file names it lists must lie inside the directory.
``torchkit.pt`` also records an XXH3-128 digest of every DCP file (each rank hashes the
shards it wrote), and every load verifies them first, the ranks sharing the files between
them, so a flipped bit in a shard is found before anything is loaded.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchkit._utils import TMP_MARK, unwrap
from torchkit.checkpoint._errors import CheckpointError
from torchkit.checkpoint._files import build_payload, write_payload
from torchkit.checkpoint._integrity import read_checkpoint
from torchkit.checkpoint._shards import file_digest, rank_digests, verify_dcp_files
from torchkit.state import get_rng_state

__all__ = ["DIGESTS", "META", "consolidate_checkpoint", "is_dcp_dir", "load_dcp",
           "read_dcp_payload", "save_dcp", "state_is_sharded", "verify_dcp_files"]

META = "torchkit.pt"  # the torchkit part of a DCP checkpoint directory
DIGESTS = "dcp_digests"  # in its payload: {DCP file name: XXH3-128 hex digest}
_REF = "__torchkit_dcp__"  # marks a tensor leaf stored in the DCP files
# What DCP's .metadata may name: its own dataclasses and a few plain torch / stdlib types.
_SAFE_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "LoadItemType"),
    ("torch", "Size"), ("torch", "strided"), ("torch", "device"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),  # the checkpoint id DCP records
} | {("torch", name) for name in dir(torch) if isinstance(getattr(torch, name, None),
                                                            torch.dtype | torch.layout)}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata type")
        return super().find_class(module, name)


def _reader(path: Path) -> Any:
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    class SafeReader(FileSystemReader):
        """FileSystemReader whose ``.metadata`` cannot run code or point outside ``path``."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return read_metadata(path)

    return SafeReader(os.fspath(path))


def read_metadata(path: Path) -> Any:
    """Read DCP's ``.metadata`` of ``path`` with the allow-list unpickler; check file names."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    file = path / ".metadata"
    try:
        with open(file, "rb") as f:
            meta = _MetadataUnpickler(io.BytesIO(f.read())).load()
    except FileNotFoundError:
        raise CheckpointError(path, "is not a complete DCP checkpoint (no .metadata)") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as error:
        raise CheckpointError(path, f"has an unsafe or corrupt .metadata: {error}") from None
    for info in (getattr(meta, "storage_data", None) or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
            raise CheckpointError(path, f".metadata names data file {name!r}, which is not "
                                  "a plain file name inside the directory; refusing it")
    if getattr(meta, "storage_meta", None) is None:
        meta.storage_meta = StorageMeta()
    return meta


def _load_planner() -> Any:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class TensorsOnly(DefaultLoadPlanner):
        """DefaultLoadPlanner that refuses pickled byte items (torch reads them unsafely)."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            raise CheckpointError(read_item.dest_index.fqn, "is a pickled object in the DCP "
                                  "files; torchkit never writes those and will not unpickle it")

    return TensorsOnly()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide DCP's warnings about its own code, which the user can do nothing about.

    DCP warns on every single-process call, even one that asked for it (no_dist); on torch
    2.8 its file writer calls the deprecated ``tensor.storage()`` (TypedStorage warning,
    fixed in later torch). torch warns about TypedStorage once per process: whether it
    has is restored, so the user's own ``storage()`` calls still get that warning.
    """
    warner = getattr(torch.storage, "_warn_typed_storage_removal", None)
    flags: dict[str, Any] = getattr(warner, "__dict__", {})
    warned = flags.get("has_warned")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled",
                                category=UserWarning)
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated",
                                category=UserWarning,
                                module=r"torch\.distributed\.checkpoint\.")
        try:
            yield
        finally:
            if warned is None:
                flags.pop("has_warned", None)
            else:
                flags["has_warned"] = warned


def _is_dcp_error(error: BaseException) -> bool:
    from torch.distributed.checkpoint.api import CheckpointException

    return isinstance(error, CheckpointException | OSError | RuntimeError | ValueError)


def is_dcp_dir(path: Path) -> bool:
    """Whether ``path`` is a DCP checkpoint directory written by torchkit."""
    return path.is_dir() and (path / META).is_file()


def _sharded(t: Any) -> bool:
    return type(t).__name__ == "DTensor" or (
        isinstance(t, nn.Parameter) and type(t.data).__name__ == "DTensor")


def state_is_sharded(state: Mapping[str, Any]) -> bool:
    """Whether a model in ``state`` has DTensor parameters (FSDP2, tensor parallel)."""
    return any(isinstance(obj, nn.Module) and any(_sharded(p) for p in unwrap(obj).parameters())
               for obj in state.values())


def _model_of(state: Mapping[str, Any]) -> nn.Module:
    models = [obj for obj in state.values() if isinstance(obj, nn.Module)]
    if len(models) != 1:
        raise ValueError(f"a DCP checkpoint with an optimizer needs exactly one model in "
                         f"state, to name its parameters; got {len(models)}")
    return models[0]


def _dcp_states(state: Mapping[str, Any], *, for_load: bool) -> dict[str, Any]:
    """The state dicts of the models and optimizers in ``state`` (DCP's FQN-keyed form)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    out: dict[str, Any] = {}
    for name, obj in state.items():
        if isinstance(obj, nn.Module):
            out[name] = get_model_state_dict(unwrap(obj))
        elif isinstance(obj, torch.optim.Optimizer):
            out[name] = get_optimizer_state_dict(unwrap(_model_of(state)), obj)
    return out


def _split(tree: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move ``tree``'s tensor leaves into ``tensors``; return the tree with references."""
    if isinstance(tree, torch.Tensor):
        tensors[key] = tree
        return {_REF: key}
    if isinstance(tree, Mapping):
        return {k: _split(v, f"{key}/{k}", tensors) for k, v in tree.items()}
    if type(tree) in (list, tuple):
        return type(tree)(_split(v, f"{key}/{i}", tensors) for i, v in enumerate(tree))
    return tree


def _refs(tree: Any, out: set[str]) -> set[str]:
    """The DCP keys a saved skeleton refers to."""
    if isinstance(tree, Mapping):
        if set(tree) == {_REF}:
            out.add(tree[_REF])
        else:
            for v in tree.values():
                _refs(v, out)
    elif type(tree) in (list, tuple):
        for v in tree:
            _refs(v, out)
    return out


def _join(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(tree, Mapping):
        if set(tree) == {_REF}:
            return tensors[tree[_REF]]
        return {k: _join(v, tensors) for k, v in tree.items()}
    if type(tree) in (list, tuple):
        return type(tree)(_join(v, tensors) for v in tree)
    return tree


class _Saved:
    """A state dict presented as a stateful object (so build_payload files it as one)."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:  # pragma: no cover - never loaded
        self.state = state


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_dcp(path: Path, state: Mapping[str, Any], *, step: int, epoch: int | None,
             metrics: Mapping[str, float], seq: int, durable: bool) -> None:
    """Write ``state`` to the DCP directory ``path`` atomically; every rank calls it.

    Rank 0 picks a temporary directory beside ``path``; every rank writes its shards
    there; rank 0 writes ``torchkit.pt`` into it and, after a barrier, renames it to
    ``path`` (replacing an older one of the same name). A kill before the rename leaves
    only the temporary directory, which the next manager removes.
    """
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save

    rank, world = _world()
    names = [f".{path.name}{TMP_MARK}{os.getpid()}-dcp"]
    if world > 1:
        dist.broadcast_object_list(names, src=0)
    tmp = path.parent / names[0]
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if world > 1:
        dist.barrier()
    states = _dcp_states(state, for_load=False)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = {name: _split(value, name, tensors) for name, value in states.items()}
    with _quiet():
        save(tensors, storage_writer=FileSystemWriter(os.fspath(tmp), sync_files=durable),
                 no_dist=world == 1)
    mine = (get_rng_state(), rank_digests(tmp, rank, skip=META))  # hashed by its writer
    shares: list[Any] = [mine]
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, mine)
    rngs = [rng for rng, _ in shares]
    if rank == 0:
        digests = {name: hexdigest for _, share in shares for name, hexdigest in share.items()}
        for name in sorted({p.name for p in tmp.iterdir()} - set(digests) - {META}):
            digests[name] = file_digest(tmp / name)  # named otherwise by this torch's DCP
        rest = {name: _Saved(skeleton[name]) if name in skeleton else obj
                for name, obj in state.items()}
        payload = build_payload(rest, step=step, epoch=epoch, metrics=metrics, seq=seq)
        payload["rng"], payload["rank_rngs"], payload["dcp"] = rngs[0], rngs, list(skeleton)
        payload[DIGESTS] = digests
        write_payload(payload, tmp / META, durable=durable)
    if world > 1:
        dist.barrier()  # every rank's shards are complete
    if rank == 0:
        old = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-old"
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        if durable:
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def read_dcp_payload(path: Path, *, verify: bool = True) -> dict[str, Any]:
    """Read (and verify) the ``torchkit.pt`` of a DCP directory."""
    if not is_dcp_dir(path):
        raise CheckpointError(path, f"is not a torchkit DCP checkpoint directory (no {META})")
    payload = read_checkpoint(path / META, verify=verify)
    if not isinstance(payload.get("dcp"), list):
        raise CheckpointError(path, f"{META} does not describe a DCP checkpoint")
    return payload


def load_dcp(path: Path, payload: Mapping[str, Any], state: Mapping[str, Any], *,
             strict: bool) -> dict[str, Any]:
    """Load the DCP-stored states named in ``state`` in place (resharding as needed).

    Returns ``payload["state"]`` with the DCP entries replaced by the loaded state dicts,
    so the caller can hand the remaining (plain) entries to their objects.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.checkpoint.state_dict_loader import load

    saved = dict(payload["state"])
    wanted = {name: obj for name, obj in state.items() if name in payload["dcp"]}
    targets = _dcp_states(wanted | ({"__model__": _model_of(state)} if any(
        isinstance(o, torch.optim.Optimizer) for o in wanted.values()) and not any(
        isinstance(o, nn.Module) for o in wanted.values()) else {}), for_load=True)
    targets.pop("__model__", None)
    target_tensors: dict[str, torch.Tensor] = {}
    for name, value in targets.items():
        _split(value, name, target_tensors)
    expected: set[str] = set()
    for name in targets:
        _refs(saved[name], expected)  # what the files hold
    missing = sorted(set(target_tensors) - set(expected))
    unexpected = sorted(set(expected) - set(target_tensors))
    if strict and (missing or unexpected):
        raise CheckpointError(path, f"the DCP state does not fit: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
    load_tensors = {k: v for k, v in target_tensors.items() if k in expected}
    read_metadata(path)  # refused here, before DCP (which wraps errors per rank) reads it
    try:
        with _quiet():
            load(load_tensors, storage_reader=_reader(path), planner=_load_planner(),
                     no_dist=_world()[1] == 1)
    except CheckpointError:
        raise
    except BaseException as error:  # DCP wraps rank failures in CheckpointException
        if not _is_dcp_error(error):
            raise
        raise CheckpointError(path, f"DCP load failed: {error}") from error
    options = StateDictOptions(strict=strict)
    for name, obj in wanted.items():
        loaded = _join(saved[name], {**target_tensors, **load_tensors})
        if isinstance(obj, nn.Module):
            set_model_state_dict(unwrap(obj), loaded, options=options)
        else:
            set_optimizer_state_dict(unwrap(_model_of(state)), obj, loaded, options=options)
        saved[name] = None  # loaded here
    return saved


def consolidate_checkpoint(dcp_dir: str | os.PathLike[str], out_path: str | os.PathLike[str], *,
                           durable: bool = True) -> Path:
    """Gather a sharded (DCP) checkpoint into one ordinary torchkit checkpoint file.

    Runs in one plain process (no process group, no model needed): the DCP files are
    checked against their digests, every tensor is read whole from the shards, the file
    is written atomically with a digest, and
    :func:`load_checkpoint` then reads it into a plain (unsharded) model, e.g. for
    deployment or :func:`extract_weights`. The model's keys are its parameter names;
    an optimizer's state is in ``torch.distributed.checkpoint.state_dict``'s form
    (keyed by parameter name), which ``set_optimizer_state_dict`` loads.

    Args:
        dcp_dir: A checkpoint directory written by ``CheckpointManager(format="dcp")``.
        out_path: The file to write.
        durable: fsync the file and its directory.

    Returns:
        ``out_path``.

    Raises:
        CheckpointError: If ``dcp_dir`` is not a readable torchkit DCP checkpoint, or
            one of its files changed since it was written ("digest mismatch").

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> manager = tk.CheckpointManager(folder, format="dcp")
        >>> path = manager.save({"model": nn.Linear(2, 1)}, step=1)
        >>> out = tk.consolidate_checkpoint(path, folder / "model.pt")
        >>> tk.load_checkpoint(out, {"model": nn.Linear(2, 1)})["step"]
        1
    """
    from torch.distributed.checkpoint.state_dict_loader import load

    path = Path(dcp_dir)
    payload = read_dcp_payload(path)
    verify_dcp_files(path, payload.get(DIGESTS))
    meta = read_metadata(path)
    tensors: dict[str, torch.Tensor] = {}
    for key, info in meta.state_dict_metadata.items():
        if not hasattr(info, "size"):
            raise CheckpointError(path, f"DCP item {key!r} is not a tensor")
        tensors[key] = torch.empty(info.size, dtype=info.properties.dtype)
    try:
        with _quiet():
            load(tensors, storage_reader=_reader(path), planner=_load_planner(),
                     no_dist=True)
    except CheckpointError:
        raise
    except BaseException as error:
        if not _is_dcp_error(error):
            raise
        raise CheckpointError(path, f"DCP load failed: {error}") from error
    state: dict[str, Any] = {}
    for name, value in payload["state"].items():
        kind = payload["kinds"].get(name)
        state[name] = _Saved(_join(value, tensors)) if kind == "stateful" else value
    out = build_payload(state, step=payload["step"], epoch=payload["epoch"],
                        metrics=payload["metrics"], seq=payload.get("seq"))
    out["rng"] = payload["rng"]
    return write_payload(out, Path(out_path), durable=durable)
