"""History: the per-epoch record of metrics that ``Trainer.fit`` returns."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from torchkit._utils import check_keys, require

__all__ = ["History"]


class History:
    """Per-epoch metrics of a training run, in order.

    Each record is a dict such as ``{"epoch": 0, "train_loss": 0.9, "val_loss": 0.7,
    "val_acc": 0.8, "lr": 0.01}``. ``history["val_loss"]`` gives one value per epoch
    (``nan`` for an epoch that did not record it).

    Example:
        >>> history = tk.History()
        >>> history.append({"epoch": 0, "val_loss": 0.5, "val_acc": 0.8})
        >>> history.append({"epoch": 1, "val_loss": 0.3, "val_acc": 0.9})
        >>> history["val_loss"]
        [0.5, 0.3]
        >>> history.best("val_acc", "max"), history.best_epoch("val_loss")
        (0.9, 1)
        >>> len(history), history.keys()
        (2, ['epoch', 'val_loss', 'val_acc'])
    """

    def __init__(self, records: list[Mapping[str, Any]] | None = None) -> None:
        if records is not None and (isinstance(records, str | bytes | Mapping) or not all(
                isinstance(r, Mapping) for r in _as_list(records, "records"))):
            raise TypeError(f"records must be a list of dicts (one per epoch) or None, got "
                            f"{records!r:.80}")
        self.records: list[dict[str, Any]] = [dict(r) for r in records or []]

    def append(self, record: Mapping[str, Any]) -> None:
        """Add one epoch's record."""
        self.records.append(dict(record))

    def keys(self) -> list[str]:
        """Return every metric name recorded, in first-seen order."""
        seen: dict[str, None] = {}
        for record in self.records:
            seen.update(dict.fromkeys(record))
        return list(seen)

    def __getitem__(self, key: str) -> list[Any]:
        if key not in self.keys():
            raise KeyError(f"no metric {key!r} in the history; it has {self.keys()}")
        return [record.get(key, math.nan) for record in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __repr__(self) -> str:
        return f"History(epochs={len(self)}, keys={self.keys()})"

    def _best_index(self, key: str, mode: Literal["min", "max"]) -> int:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        values = [(v, i) for i, v in enumerate(self[key])
                  if isinstance(v, int | float) and not math.isnan(v)]
        if not values:
            raise ValueError(f"metric {key!r} has no recorded value to rank")
        sign = 1 if mode == "min" else -1
        return min(values, key=lambda vi: (sign * vi[0], vi[1]))[1]

    def best(self, key: str, mode: Literal["min", "max"] = "min") -> float:
        """Return the best value of ``key`` over the epochs (the first, on ties).

        Raises:
            KeyError: If ``key`` was never recorded.
            ValueError: If ``mode`` is unknown or ``key`` has only ``nan`` values.
        """
        return float(self.records[self._best_index(key, mode)][key])

    def best_epoch(self, key: str, mode: Literal["min", "max"] = "min") -> int:
        """Return the ``epoch`` of the best value of ``key`` (see :meth:`best`)."""
        record = self.records[self._best_index(key, mode)]
        return int(record.get("epoch", self._best_index(key, mode)))

    def plot(self, path: str | os.PathLike[str] | None = None, *,
             keys: list[str] | None = None) -> Any:
        """Draw loss and metric curves per epoch; save a PNG to ``path`` if given.

        ``train_X`` and ``val_X`` share one panel; ``lr`` gets its own. Needs
        matplotlib (``pip install "torchkit[plot]"``).

        Args:
            path: Where to write the PNG.
            keys: The metrics to draw; default all but ``epoch`` and ``time_s``.

        Returns:
            The ``matplotlib.figure.Figure``.

        Raises:
            ImportError: If matplotlib is missing.
            ValueError: If the history is empty.
        """
        if not self.records:
            raise ValueError("the history is empty: nothing to plot")
        figure_module = require("matplotlib.figure", extra="plot")
        wanted = keys or [k for k in self.keys() if k not in ("epoch", "time_s")]
        panels: dict[str, list[str]] = {}
        for key in wanted:
            base = key.split("_", 1)[1] if key.startswith(("train_", "val_")) else key
            panels.setdefault(base, []).append(key)
        fig = figure_module.Figure(figsize=(4.5 * len(panels), 3.5), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        epochs = self["epoch"] if "epoch" in self.keys() else list(range(len(self)))
        for ax, (base, members) in zip(axes, panels.items()):
            for key in members:
                ax.plot(epochs, self[key], marker="o", markersize=3, label=key)
            ax.set_title(base)
            ax.set_xlabel("epoch")
            ax.legend()
        if path is not None:
            fig.savefig(Path(path), dpi=100)
        return fig

    def state_dict(self) -> dict[str, Any]:
        """Return the records."""
        return {"records": [dict(r) for r in self.records]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the records returned by :meth:`state_dict`."""
        check_keys(state_dict, expected={"records"}, owner=type(self).__name__)
        self.records = [dict(r) for r in state_dict["records"]]


def _as_list(records: Any, name: str) -> list[Any]:
    try:
        return list(records)
    except TypeError:
        raise TypeError(f"{name} must be a list of dicts (one per epoch) or None, got "
                        f"{type(records).__name__}") from None
