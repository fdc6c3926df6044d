"""Digests of a DCP checkpoint's files: hashed by the rank that wrote each, checked by all.

``torchkit.pt`` (itself digest-verified) records an XXH3-128 digest of every file DCP
wrote, so a flipped bit or a missing shard is found before DCP reads anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist
import xxhash

from torchkit.checkpoint._errors import CheckpointError
from torchkit.distributed import get_rank, get_world_size

__all__ = ["file_digest", "rank_digests", "verify_dcp_files"]


def file_digest(path: Path) -> str:
    """The XXH3-128 hex digest of the file at ``path``, read in 4 MiB chunks."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def rank_digests(folder: Path, rank: int, *, skip: str) -> dict[str, str]:
    """The digests of the DCP files ``rank`` wrote into ``folder``, by file name.

    Those are ``__<rank>_*`` (and, for rank 0, DCP's ``.metadata``); ``skip`` names
    torchkit's own file, which carries its own digest.
    """
    return {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.name != skip and (
        p.name.startswith(f"__{rank}_") or (rank == 0 and not p.name.startswith("__")))}


def verify_dcp_files(path: Path, digests: Any) -> None:
    """Check every file of the DCP directory ``path`` against its recorded digest.

    Under a process group this is a collective: each rank hashes its share of the files,
    and every rank raises if any rank found one bad. ``None`` (no digests recorded, as
    in 0.2 development versions) checks nothing.

    Raises:
        CheckpointError: If a file is missing or its bytes changed (on every rank), or a
            recorded name is not a plain file name (nothing outside ``path`` is read).
    """
    if digests is None:
        return
    if not isinstance(digests, dict) or not all(
            isinstance(name, str) and isinstance(value, str) and Path(name).name == name
            and name not in ("", ".", "..") for name, value in digests.items()):
        raise CheckpointError(path, "its DCP file digests are not plain file names inside "
                              "the directory with their digests; refusing them")
    rank, world = get_rank(), get_world_size()
    names = sorted(digests)
    bad = [name for name in names[rank::world] if not (path / name).is_file()
           or file_digest(path / name) != digests[name]]
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, bad)
        bad = sorted(name for share in gathered for name in share)
    if bad:
        raise CheckpointError(path, f"corrupt: digest mismatch in {', '.join(bad[:8])}: "
                              "those DCP files changed (or went missing) after they were "
                              "written")
