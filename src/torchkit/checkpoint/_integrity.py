"""The checkpoint file format: a torch zip archive, then a digest trailer; verified reads.

A torchkit checkpoint is what ``torch.save`` writes (a zip archive of uncompressed
records), followed by a 48-byte trailer::

    b"TORCHKIT" | b"XXH3-128" | digest (16 bytes) | archive length (8 bytes, little end.)
    | b"TKDIGEST"

The digest is XXH3-128 of the archive bytes, computed while they are written, so a
save reads nothing back. ``torch.load`` ignores bytes after an archive, so the file
still loads with plain ``torch.load(path, weights_only=True)``. XXH3 is not a
cryptographic hash: it catches corruption (a flipped bit, a torn or truncated write),
which is what it is for; code execution is prevented separately, by ``weights_only``.
Before ``torch.load`` runs, the archive's directory is checked, so a compressed record
(a small file that would expand into a huge tensor) or a record claiming more bytes
than the file holds is refused without allocating anything.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path
from typing import IO, Any

import torch
import xxhash

from torchkit.checkpoint._errors import CheckpointError

__all__ = ["HashingWriter", "read_checkpoint", "trailer"]

FORMAT = "torchkit.checkpoint"
FORMAT_VERSION = 2  # 2: digest trailer and save sequence (1: torchkit 0.1)
ALGORITHM = b"XXH3-128"
_HEAD, _TAIL = b"TORCHKIT", b"TKDIGEST"
_TRAILER = struct.Struct("<8s8s16sQ8s")
TRAILER_SIZE = _TRAILER.size  # 48
_MIN_SIZE = 22  # the smallest zip archive (an empty end-of-directory record)


class HashingWriter:
    """A binary file wrapper that hashes what is written and remembers a failed write.

    ``torch.save`` turns an ``OSError`` raised by ``write`` into a ``RuntimeError``
    ("unexpected pos ..."); :attr:`error` keeps the original (e.g. ``ENOSPC``) so the
    caller can raise that instead.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._hash = xxhash.xxh3_128()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            written = self._file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise
        self._hash.update(data)
        self.size += len(memoryview(data))
        return written

    def flush(self) -> None:
        self._file.flush()

    def digest(self) -> bytes:
        return self._hash.digest()


def trailer(writer: HashingWriter) -> bytes:
    """The trailer to append after the archive that ``writer`` has hashed."""
    return _TRAILER.pack(_HEAD, ALGORITHM, writer.digest(), writer.size, _TAIL)


def _open_path(file: IO[bytes], path: Path) -> str:
    """A path that names the already opened file (so no rename can swap it under us)."""
    proc = f"/proc/self/fd/{file.fileno()}"
    return proc if sys.platform.startswith("linux") and os.path.exists(proc) else str(path)


def read_checkpoint(path: str | os.PathLike[str], *, map_location: Any = "cpu",
                    mmap_tensors: bool | None = None, verify: bool = True) -> dict[str, Any]:
    """Load, verify and validate a checkpoint file's payload, or raise ``CheckpointError``.

    Args:
        path: The file.
        map_location: As for :func:`torch.load`.
        mmap_tensors: Map the tensors from the file (copy-on-write) instead of reading
            them into new memory; ``None``: on POSIX systems. The digest check has just
            brought the file into the page cache, so mapping it saves a second copy of
            every byte (``load_state_dict`` copies into the model anyway). Files are
            only ever replaced by a rename, never rewritten in place, so a mapped
            tensor keeps its bytes. Windows cannot delete a mapped file, hence the
            default off there.
        verify: Check the digest (and refuse a file of the current format without one).
    """
    if mmap_tensors is None:
        mmap_tensors = os.name == "posix"
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file" if not path.exists() else "not a file")
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size < _MIN_SIZE:
            raise CheckpointError(path, f"truncated: {size} bytes, too short to be a "
                                  "checkpoint (an interrupted copy or a full disk?)")
        archive_size = _verified_size(file, size, path, verify=verify)
        is_zip = file.read(4) == b"PK\x03\x04"
        file.seek(0)
        if is_zip:
            _check_records(file, archive_size, path)
        payload = _torch_load(_open_path(file, path), path, map_location=map_location,
                              mmap_tensors=mmap_tensors and is_zip)
    _check_payload(payload, path, has_digest=archive_size != size, verify=verify)
    return payload  # type: ignore[no-any-return]


def _verified_size(file: IO[bytes], size: int, path: Path, *, verify: bool) -> int:
    """The archive's length: the file's, or what the trailer says after checking it."""
    if size < TRAILER_SIZE + _MIN_SIZE:
        return size
    file.seek(size - TRAILER_SIZE)
    head, algorithm, digest, length, tail = _TRAILER.unpack(file.read(TRAILER_SIZE))
    file.seek(0)
    if head != _HEAD or tail != _TAIL:
        return size  # no trailer: a torchkit 0.1 file, or a damaged one (see _check_payload)
    if algorithm != ALGORITHM or length != size - TRAILER_SIZE:
        raise CheckpointError(path, f"corrupt: its digest trailer is damaged (algorithm "
                              f"{algorithm!r}, archive length {length} of {size} bytes)")
    if verify:
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
            actual = xxhash.xxh3_128(memoryview(view)[:length]).digest()
        if actual != digest:
            raise CheckpointError(
                path, "corrupt: digest mismatch, its bytes changed after it was written "
                "(a disk or copy error); load an older checkpoint"
            )
    return int(length)


def _check_records(file: IO[bytes], archive_size: int, path: Path) -> None:
    """Refuse compressed records and records that claim more bytes than the file has."""
    try:
        with zipfile.ZipFile(file) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as error:
        raise CheckpointError(path, f"cannot be read, it is truncated or corrupt (its zip "
                              f"directory: {error})") from error
    finally:
        file.seek(0)
    problems = []
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            problems.append(f"record {info.filename!r} is compressed (method "
                            f"{info.compress_type}); torch.save never compresses")
        elif info.header_offset + info.file_size > archive_size or \
                info.compress_size != info.file_size:
            problems.append(f"record {info.filename!r} claims {info.file_size} bytes, more "
                            f"than the file's {archive_size}")
    if problems:
        raise CheckpointError(path, "refused: " + "; ".join(problems[:3]) +
                              (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))


def _torch_load(source: str, path: Path, *, map_location: Any, mmap_tensors: bool) -> Any:
    try:
        return torch.load(source, map_location=map_location, weights_only=True,
                          mmap=mmap_tensors)
    except pickle.UnpicklingError as error:
        # weights_only refuses anything but tensors and plain data: no code has run.
        raise CheckpointError(
            path, f"refused to load: it holds more than tensors and plain data, and loading it "
            f"could run code ({_unpickler_cause(error)})"
        ) from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError,
            IndexError, TypeError, AttributeError, ImportError, MemoryError,
            OverflowError, struct.error) as error:
        raise CheckpointError(
            path, f"cannot be read, it is truncated or corrupt ({type(error).__name__}: "
            f"{_first_line(error)})"
        ) from error


def _check_payload(payload: Any, path: Path, *, has_digest: bool, verify: bool) -> None:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(path, "not a torchkit checkpoint (no torchkit format marker)")
    version = payload.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise CheckpointError(
            path, f"written in format version {version}, newer than this torchkit reads "
            f"({FORMAT_VERSION}); upgrade torchkit"
        )
    if version >= 2 and not has_digest and verify:
        raise CheckpointError(path, "corrupt: its digest trailer is missing or damaged "
                              "(truncated, or changed after it was written)")
    missing = {"state", "kinds", "rng", "step", "epoch", "metrics"} - set(payload)
    if missing:
        raise CheckpointError(path, f"incomplete torchkit checkpoint: no {sorted(missing)}")
    if not isinstance(payload["state"], dict) or not isinstance(payload["kinds"], dict):
        raise CheckpointError(path, "corrupt: its state or kinds is not a dict")


def _unpickler_cause(error: BaseException) -> str:
    for line in str(error).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
