"""What a failed rank reports, which failure came first, and the LaunchError made of it."""

from __future__ import annotations

import re
import signal
import sys
from dataclasses import dataclass

__all__ = ["GUARD_HINT", "Failure", "LaunchError", "launch_error"]

# torch.distributed errors a rank raises because *another* rank failed first.
_COLLATERAL = {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}
# ...and what such errors say when they come as a plain RuntimeError.
_PEER_TROUBLE = re.compile(r"[Cc]onnection (reset|closed|refused)|[Bb]roken pipe|by peer|"
                           r"[Tt]imed out|[Tt]imeout|Socket|ECONNRESET|EPIPE")


class LaunchError(RuntimeError):
    """A rank of :func:`launch` raised an exception or died; the other ranks were stopped.

    The message holds the rank's exception type, message and formatted traceback.

    Attributes:
        rank: The rank that failed first.
        exception_type: The name of its exception's type, or ``None`` if it died
            without reporting one (killed, crashed, or ``os._exit``).
        exitcode: Its exit code when it died without reporting (negative: the signal
            number that killed it), else ``None``.
        traceback: Its formatted traceback (empty if it died without reporting).

    Example:
        >>> error = tk.LaunchError("rank 1 of 2 failed", rank=1, exception_type="ValueError")
        >>> isinstance(error, RuntimeError), error.rank, error.exception_type
        (True, 1, 'ValueError')
    """

    __module__ = "torchkit.distributed"  # its public path, as tracebacks name it

    def __init__(
        self,
        message: str,
        *,
        rank: int,
        exception_type: str | None = None,
        exitcode: int | None = None,
        traceback: str = "",
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.exception_type = exception_type
        self.exitcode = exitcode
        self.traceback = traceback


GUARD_HINT = (
    'put the code that calls launch under `if __name__ == "__main__":` in your script: '
    "each worker process is started with the 'spawn' method and imports your script "
    "again, and without the guard that import calls launch once more"
)


def _main_lacks_guard() -> bool:
    """Whether the main script has no ``if __name__ == "__main__":`` guard (best effort)."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not path:
        return False
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError):
        return False
    return "__main__" not in source


@dataclass
class Failure:
    rank: int
    exception_type: str | None  # None: the process died without reporting
    message: str = ""
    traceback: str = ""
    exitcode: int | None = None
    port_taken: bool = False
    time: float = 0.0

    def collateral(self) -> bool:
        """Whether this looks like a consequence of another rank's failure."""
        return self.exception_type in _COLLATERAL or (
            self.exception_type is not None and _PEER_TROUBLE.search(self.message) is not None)

    def sort_key(self) -> tuple[bool, float]:
        # Root causes first, then by time of death (a silent death is dated when its
        # process object's sentinel fired; a reported error when the rank raised it).
        return self.collateral(), self.time


def launch_error(failures: list[Failure], nprocs: int) -> LaunchError:
    first = failures[0]
    if first.exception_type is None and first.message == "hung":
        peers = ", ".join(f"rank {f.rank} ({f.exception_type}: {f.message[:200]})"
                          for f in failures[1:])
        message = (
            f"rank {first.rank} of {nprocs} hung: it neither finished nor failed while "
            f"its peers gave up waiting for it ({peers}); it was terminated. Look for an "
            "endless loop, a deadlock or a collective only some ranks call"
        )
        return LaunchError(message, rank=first.rank)
    if first.exception_type is None:
        code = first.exitcode
        how = f"exited with code {code}"
        if code is not None and code < 0:
            how = f"was killed by signal {signal.Signals(-code).name}"
        message = (
            f"rank {first.rank} of {nprocs} {how} without reporting a result or an error "
            f"(killed, e.g. by the out-of-memory killer, crashed, or called os._exit); "
            f"the other ranks were terminated"
        )
        if code == 1 and _main_lacks_guard():
            message += f". If the script has no __main__ guard: {GUARD_HINT}"
    else:
        message = (
            f"rank {first.rank} of {nprocs} raised {first.exception_type}: {first.message}; "
            f"the other ranks were terminated. Traceback from rank {first.rank}:\n\n"
            f"{first.traceback.rstrip()}"
        )
    others = [f"rank {f.rank} ({f.exception_type or f'exit code {f.exitcode}'})"
              for f in failures[1:]]
    if others:
        message += f"\n\nAlso failed, probably as a consequence: {', '.join(others)}"
    return LaunchError(message, rank=first.rank, exception_type=first.exception_type,
                       exitcode=first.exitcode, traceback=first.traceback)
