"""Private: the training loss ledger, with the non-finite policy chosen once."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Literal

import torch

from torchkit._utils import check_keys
from torchkit.trainer import _distributed as ddp

__all__ = ["SUM_DTYPE", "LossLedger", "make_ledger"]

_log = logging.getLogger("torchkit.trainer")

_CHECK_INTERVAL_S = 1.0  # policy "raise": losses are checked in bulk about this often
_FOLD_EVERY = 64  # policy "raise": pending losses are summed in chunks of this many
# float32, like the losses themselves: a float64 sum would add a cast to every step
# (evaluation sums use it too).
SUM_DTYPE = torch.float32


def make_ledger(nonfinite: Literal["raise", "skip"], *, device: torch.device,
                scaled: bool) -> LossLedger:
    """The ledger for ``Trainer(nonfinite=...)``: the one place the policy is chosen."""
    if nonfinite == "skip":
        return _SkippingLedger(device, scaled=scaled)
    return _RaisingLedger(device)


class LossLedger:
    """The sample-weighted sum of an epoch's training losses, kept on the device.

    The trainer calls :meth:`add` once per batch and :meth:`end_window` once per optimizer
    step; the host reads the sums only in :meth:`running` (the progress bar),
    :meth:`nonfinite` (bulk checks) and :meth:`close_epoch`. Subclasses are the two
    non-finite policies; the trainer never branches on which one it has.

    Example:
        >>> ledger = make_ledger("raise", device=torch.device("cpu"), scaled=False)
        >>> ledger.add(torch.tensor(2.0), 3, 0, 0)
        >>> ledger.add(torch.tensor(1.0), 1, 1, 0)
        >>> ledger.end_window(True, epoch=0, batch_idx=1, step=1)
        >>> ledger.running(), ledger.nonfinite(), ledger.close_epoch()
        ({'loss': 1.75}, False, 1.75)
    """

    #: Whether losses are checked in bulk (so the trainer checks them at the epoch end
    #: and before every checkpoint).
    checks_in_bulk = False

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.epoch_loss = torch.zeros((), dtype=SUM_DTYPE, device=device)
        self.epoch_count = 0
        self.window_size = 0  # samples in the optimizer step being accumulated

    def open_epoch(self) -> None:
        """Start a fresh epoch's sums."""
        self.epoch_loss.zero_()
        self.epoch_count = 0

    def add(self, loss: torch.Tensor, size: int, batch_idx: int, step: int) -> None:
        """Book one batch's (detached) mean loss over ``size`` samples."""
        raise NotImplementedError

    def end_window(self, stepped: bool, *, epoch: int, batch_idx: int, step: int) -> None:
        """Close the optimizer step's window; ``stepped`` is whether it was applied."""
        self.epoch_count += self.window_size
        self.window_size = 0

    def fold(self) -> None:
        """Add pending losses to the epoch's sum (at fixed points, so sums are exact)."""

    def due(self) -> bool:
        """Whether a time-based bulk check is due (single process only)."""
        return False

    def nonfinite(self) -> bool:
        """Whether a loss booked since the last check was nan/inf (one host read, if any)."""
        return False

    def error(self, epoch: int, *, here: bool) -> FloatingPointError:
        """The error for a nan/inf loss found by :meth:`nonfinite` (here or on another rank)."""
        return FloatingPointError(f"the loss became nan/inf on another rank in epoch {epoch}; "
                                  "see that rank's error")

    def running(self) -> dict[str, float]:
        """The epoch's mean loss so far, for the progress bar (one host read)."""
        count = self.epoch_count + self.window_size
        if not count:
            return {}
        return {"loss": float(self._total()) / count}

    def _total(self) -> torch.Tensor:
        return self.epoch_loss

    def close_epoch(self) -> float | None:
        """The epoch's mean loss over all ranks' samples, or ``None`` without samples."""
        self.fold()
        totals = ddp.all_reduce_sum(torch.stack([
            self.epoch_loss.detach().clone(),
            torch.tensor(float(self.epoch_count), dtype=SUM_DTYPE, device=self.device),
        ]))  # over all ranks' samples (DistributedSampler's padding included, as trained)
        if totals[1] > 0:
            return float(totals[0] / totals[1])
        return None

    def state_dict(self) -> dict[str, Any]:
        """The epoch's sums so far (pending losses folded in)."""
        self.fold()
        return {"loss": self.epoch_loss.detach().to("cpu", copy=True), "count": self.epoch_count}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        check_keys(state_dict, expected=("loss", "count"), owner="Trainer's loss ledger")
        self.epoch_loss = state_dict["loss"].to(self.device, SUM_DTYPE)
        self.epoch_count = state_dict["count"]


class _RaisingLedger(LossLedger):
    """Policy ``"raise"``: keep each loss, check them in bulk, raise at the first nan/inf."""

    checks_in_bulk = True

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self._pending: list[tuple[torch.Tensor, int, int, int]] = []  # not yet summed
        self._unchecked: list[tuple[torch.Tensor, int, int, int]] = []  # summed, unchecked
        self._next_check = 0.0
        self._bad: tuple[torch.Tensor, int, int, int] | None = None
        self._size_cache: dict[tuple[int, ...], torch.Tensor] = {}

    def open_epoch(self) -> None:
        super().open_epoch()
        self._pending, self._unchecked = [], []

    def add(self, loss: torch.Tensor, size: int, batch_idx: int, step: int) -> None:
        # Kept, not summed, per step: summing in chunks saves a kernel per step.
        self._pending.append((loss, size, batch_idx, step))
        if len(self._pending) >= _FOLD_EVERY:
            self.fold()
        self.window_size += size

    def fold(self) -> None:
        if not self._pending:
            return
        self.epoch_loss.add_(self._pending_sum())
        self._unchecked.extend(self._pending)
        self._pending = []

    def due(self) -> bool:
        return time.monotonic() >= self._next_check

    def nonfinite(self) -> bool:
        """Check every loss since the last check in one host read, not one per step."""
        self._next_check = time.monotonic() + _CHECK_INTERVAL_S
        entries, self._unchecked = self._unchecked + self._pending, []
        if not entries:
            return False
        finite = torch.isfinite(torch.stack([e[0] for e in entries]))
        if bool(finite.all()):
            return False
        self._bad = entries[int(torch.nonzero(~finite)[0])]
        return True

    def error(self, epoch: int, *, here: bool) -> FloatingPointError:
        if not here or self._bad is None:
            return super().error(epoch, here=here)
        _, _, batch_idx, step = self._bad
        return FloatingPointError(
            f"the loss became nan/inf at epoch {epoch}, batch {batch_idx}, optimizer "
            f"step {step}. Lower the learning rate, clip gradients (max_grad_norm=...), or "
            "pass nonfinite='skip' to skip such steps"
        )

    def _total(self) -> torch.Tensor:
        if self._pending:  # one host read for the whole chunk, not one per pending loss
            return self.epoch_loss + self._pending_sum()
        return self.epoch_loss

    def _pending_sum(self) -> torch.Tensor:
        """The sample-weighted sum of the pending losses, on the device."""
        losses = torch.stack([p[0] for p in self._pending]).to(SUM_DTYPE)
        return torch.dot(losses, self._sizes(tuple(p[1] for p in self._pending), losses.device))

    def _sizes(self, sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The sizes as a device tensor, kept for the next chunk of the same sizes.

        A fresh one would be a host-to-device copy (a synchronisation on a GPU) every
        ``_FOLD_EVERY`` steps; with a fixed batch size every chunk has the same sizes.
        """
        cached = self._size_cache.get(sizes)
        if cached is None or cached.device != device:
            if len(self._size_cache) >= 8:
                self._size_cache.clear()
            cached = torch.tensor(sizes, dtype=SUM_DTYPE, device=device)
            self._size_cache[sizes] = cached
        return cached


class _SkippingLedger(LossLedger):
    """Policy ``"skip"``: sum each window apart and leave skipped steps out of the epoch."""

    def __init__(self, device: torch.device, *, scaled: bool) -> None:
        super().__init__(device)
        self._scaled = scaled
        self._window = torch.zeros((), dtype=SUM_DTYPE, device=device)

    def add(self, loss: torch.Tensor, size: int, batch_idx: int, step: int) -> None:
        self._window.add_(loss, alpha=size)
        self.window_size += size

    def end_window(self, stepped: bool, *, epoch: int, batch_idx: int, step: int) -> None:
        size = self.window_size
        super().end_window(stepped, epoch=epoch, batch_idx=batch_idx, step=step)
        if stepped:
            self.epoch_loss.add_(self._window)
        else:
            self.epoch_count -= size
            # A GradScaler overflow (finite loss) is routine: the scaler lowers its scale.
            if not self._scaled or not bool(torch.isfinite(self._window)):
                _log.warning("skipped the optimizer step at epoch %d, batch %d, optimizer "
                             "step %d: nan/inf loss or gradients", epoch, batch_idx, step)
        self._window.zero_()
