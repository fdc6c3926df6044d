"""Classification metrics computed on the device, without a host sync per batch.

:func:`accuracy` scores one batch and returns a 0-d tensor on the outputs' device, so a
loop can sum it across batches and read it once at log time. :class:`ConfusionMatrix`
accumulates counts across batches on the device.

**The metric protocol.** ``Trainer`` (and any hand-written loop) accepts, besides plain
callables ``fn(outputs, targets) -> Tensor``, any object with these three methods —
the protocol torchmetrics follows too, described by :class:`Metric`:

- ``update(outputs, targets)``: add one batch; must not read values back to the host.
- ``compute()``: the value over every batch since the last ``reset`` (may sync).
- ``reset()``: forget every batch, ready for the next epoch.
- ``all_reduce()`` (optional): sum the state over the ranks of the default process group
  in place, so ``compute()`` covers every rank's data. ``Trainer`` calls it before
  ``compute()`` under a process group, and refuses a stateful metric that has neither
  it nor its own synchronisation (torchmetrics' ``sync_on_compute``).

**Input shapes** (class dimension 1, as in :func:`torch.nn.functional.cross_entropy`):
``outputs`` are scores (logits or probabilities) of shape ``(N, C)`` or
``(N, C, d1, ...)``; ``targets`` are class indices of shape ``(N,)`` / ``(N, d1, ...)``
(an integer tensor) or one-hot/soft labels of the same shape as ``outputs`` (reduced
with ``argmax`` over dimension 1).
"""

from __future__ import annotations

from torchkit.metrics._accuracy import accuracy
from torchkit.metrics._confusion import ConfusionMatrix
from torchkit.metrics._protocol import Metric

__all__ = ["ConfusionMatrix", "Metric", "accuracy"]
