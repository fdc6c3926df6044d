"""A tqdm progress bar whose live metrics cost a host sync at a bounded rate, not per step."""

from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

import torch

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["ProgressBar"]

_log = logging.getLogger(__name__)

# Module-level so tests can replace the clock; time.monotonic is immune to clock changes.
_clock = time.monotonic

class ProgressBar:
    r"""Show a tqdm bar with live metrics, refreshed at most once per ``refresh_interval_s``.

    :meth:`update` only counts steps and checks the clock; when a refresh is due it
    calls the ``metrics`` callable it was given (so reading a loss tensor to the host,
    e.g. ``lambda: {"loss": loss}``, happens at most once per interval, not every step)
    and redraws. Use one bar per epoch; it is a context manager.

    Args:
        total: The expected number of steps (``None``: unknown, no percentage).
        desc: A label shown before the bar, e.g. ``"epoch 3"``.
        enabled: ``False`` makes every method do nothing and creates no tqdm bar (for
            quiet runs, and on every process but rank 0).
        refresh_interval_s: The least time between two redraws (``0``: every update).
        leave: Keep the finished bar on screen after :meth:`close`.
        file: Where to draw (default: ``sys.stderr``).
        unit: The name of one step, shown in the rate (``"it/s"``).

    Raises:
        TypeError: If an option has the wrong type.
        ValueError: If ``total`` or ``refresh_interval_s`` is negative.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> loss = torch.tensor(0.25)
        >>> with tk.ProgressBar(4, desc="epoch 0", file=out, refresh_interval_s=0) as bar:
        ...     for step in range(4):
        ...         bar.update(1, metrics=lambda: {"loss": loss})
        >>> print(out.getvalue().rsplit("\r", 1)[-1].strip())
        epoch 0: 100%|...| 4/4 [..., loss=0.25]
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        desc: str = "",
        enabled: bool = True,
        refresh_interval_s: float = 0.5,
        leave: bool = True,
        file: TextIO | None = None,
        unit: str = "it",
    ) -> None:
        wrong = [
            f"{name} must be {kind}, got {value!r}"
            for name, value, ok, kind in (
                ("total", total, total is None or _is_int(total), "None or an int"),
                ("refresh_interval_s", refresh_interval_s, _is_number(refresh_interval_s),
                 "a number"),
                ("desc", desc, isinstance(desc, str), "a str"),
                ("unit", unit, isinstance(unit, str), "a str"),
            )
            if not ok
        ]
        if wrong:
            raise TypeError("; ".join(wrong))
        if (total is not None and total < 0) or not refresh_interval_s >= 0:
            raise ValueError(
                f"total must be >= 0 and refresh_interval_s a number >= 0, got total={total} "
                f"and refresh_interval_s={refresh_interval_s}"
            )
        self.enabled = bool(enabled)
        self.refresh_interval_s = float(refresh_interval_s)
        self._bar: Any = None
        self._closed = False
        self._pending = 0
        self._metrics: Callable[[], Mapping[str, float | torch.Tensor]] | None = None
        self._final_n = 0
        self._last_refresh = _clock()
        if self.enabled:
            from tqdm.auto import tqdm

            # We decide when to redraw; tqdm redraws whenever it is updated.
            self._bar = tqdm(total=total, desc=desc or None, leave=leave, file=file,
                             unit=unit, mininterval=0, miniters=1, dynamic_ncols=True)

    @property
    def n(self) -> int:
        """Steps counted so far (drawn or not yet); ``0`` for a disabled bar."""
        return self._final_n if self._bar is None else int(self._bar.n) + self._pending

    def update(
        self, n: int = 1, metrics: Callable[[], Mapping[str, float | torch.Tensor]] | None = None
    ) -> None:
        """Count ``n`` more steps; redraw, with fresh ``metrics()``, only when a refresh is due.

        Args:
            n: Steps completed since the last call.
            metrics: A zero-argument callable returning ``{name: number or one-element
                tensor}``; called only when redrawing (at most once per
                ``refresh_interval_s``), so it may read device tensors.

        Raises:
            RuntimeError: If the bar is closed.
            TypeError: When redrawing, if ``metrics`` is not callable or returns values
                that are not numbers or one-element tensors.
        """
        if self._bar is None:
            if self._closed:
                raise RuntimeError("update() on a closed ProgressBar; create a new bar")
            return
        self._pending += n
        if metrics is not None:
            self._metrics = metrics
        now = _clock()
        if now - self._last_refresh >= self.refresh_interval_s:
            self._redraw(now)

    def _redraw(self, now: float) -> None:
        if self._metrics is not None:
            metrics, self._metrics = self._metrics, None
            if not callable(metrics):
                raise TypeError(
                    f"metrics must be a zero-argument callable (e.g. lambda: {{'loss': loss}}),"
                    f" got {type(metrics).__name__}; use set_metrics(mapping) to pass values"
                )
            self._bar.set_postfix_str(_format(metrics()), refresh=False)
        self._last_refresh = now
        pending, self._pending = self._pending, 0
        if pending:
            self._bar.update(pending)
        else:
            self._bar.refresh()

    def set_metrics(self, metrics: Mapping[str, float | torch.Tensor]) -> None:
        """Show these metrics now (e.g. the epoch's final values), with every step counted.

        Raises:
            RuntimeError: If the bar is closed.
            TypeError: If a value is not a number or a one-element tensor.

        Example:
            >>> import io
            >>> out = io.StringIO()
            >>> bar = tk.ProgressBar(2, file=out)
            >>> bar.update(2)
            >>> bar.set_metrics({"val_acc": 0.875, "val_loss": torch.tensor(0.3)})
            >>> bar.close()
            >>> out.getvalue().rstrip().endswith("val_acc=0.875, val_loss=0.3]")
            True
        """
        if self._bar is None:
            if self._closed:
                raise RuntimeError("set_metrics() on a closed ProgressBar; create a new bar")
            return
        self._metrics = None
        self._bar.set_postfix_str(_format(metrics), refresh=False)
        self._redraw(_clock())

    def close(self) -> None:
        """Count pending steps, show the latest metrics, and close the bar (idempotent).

        If steps were counted since the last redraw, the last ``metrics`` callable given
        to :meth:`update` is called once more so the final bar shows current values.
        """
        if self._bar is not None:
            if self._pending or self._metrics is not None:
                self._redraw(_clock())
            self._final_n = int(self._bar.n)
            self._bar.close()
            self._bar = None
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is not None:
            self._metrics = None  # the metrics may be what failed; do not call them again
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "enabled" if self.enabled else "disabled"
        return f"{type(self).__name__}(n={self.n}, {state})"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _format(metrics: Mapping[str, float | torch.Tensor]) -> str:
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of names to numbers, got "
                        f"{type(metrics).__name__}")
    parts: list[str] = []
    bad: list[str] = []
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            parts.append(f"{name}={float(value):.4g}")
        else:
            bad.append(f"{name}={value!r}")
    if bad:
        raise TypeError(
            f"metric values must be numbers or one-element tensors, got {', '.join(bad)}"
        )
    return ", ".join(parts)
