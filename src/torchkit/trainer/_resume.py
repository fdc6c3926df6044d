"""Private: exact resume for Trainer: what a checkpoint holds, where an epoch picks up, RNG."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torchkit._utils import check_keys
from torchkit.checkpoint import CheckpointManager, load_checkpoint
from torchkit.distributed import barrier, get_rank, get_world_size, is_main_process
from torchkit.state import get_rng_state, set_rng_state
from torchkit.trainer import _distributed as ddp
from torchkit.trainer import _recipes

__all__ = ["ResumePoint", "checkpoint_state", "load", "load_callbacks", "load_trainer_state",
           "restore", "save", "trainer_state", "upgrade_legacy"]

_log = logging.getLogger("torchkit.trainer")

# What Trainer.state_dict held in torchkit 0.1.0: still loaded, so its checkpoints resume.
_LEGACY_KEYS = ("epoch", "batch_idx", "should_stop", "stop_reason", "epoch_rng", "epoch_loss",
                "epoch_count", "history", "callbacks", "logger", "rank_rngs")


# What Trainer.state_dict holds (the model, optimizer, ... are saved beside it).
_STATE_KEYS = ("epoch", "batch_idx", "should_stop", "stop_reason", "loss", "rng", "history",
               "callbacks", "logger")


def trainer_state(trainer: Any) -> dict[str, Any]:
    """``Trainer.state_dict``: progress, loss sums, every rank's RNG record, history, ..."""
    return {
        "epoch": trainer.epoch,
        "batch_idx": trainer.batch_idx,
        "should_stop": trainer.should_stop,
        "stop_reason": trainer.stop_reason,
        "loss": trainer._ledger.state_dict(),
        "rng": trainer._resume_point.state_dict(),
        "history": trainer.history.state_dict(),
        "callbacks": [cb.state_dict() for cb in trainer.callbacks],
        "logger": None if trainer.logger is None else trainer.logger.state_dict(),
    }


def load_trainer_state(trainer: Any, state: Mapping[str, Any]) -> None:
    """``Trainer.load_state_dict``: what :func:`trainer_state` returned, or 0.1.0's layout."""
    state = upgrade_legacy(state)
    check_keys(state, expected=_STATE_KEYS, owner=type(trainer).__name__)
    load_callbacks(trainer.callbacks, state["callbacks"])
    _recipes.restore_groups(trainer)  # UnfreezeSchedule's groups, before the optimizer loads
    if trainer.logger is not None and state["logger"] is not None:
        trainer.logger.load_state_dict(state["logger"])
    trainer.epoch = state["epoch"]
    trainer.batch_idx = state["batch_idx"]
    trainer.should_stop = state["should_stop"]
    trainer.stop_reason = state["stop_reason"]
    trainer._ledger.load_state_dict(state["loss"])
    trainer._resume_point.load_state_dict(state["rng"])
    trainer.history.load_state_dict(state["history"])


def save(trainer: Any, metrics: Mapping[str, float] | None) -> None:
    """Checkpoint the trainer (if it has a manager): every rank calls it at the same point.

    The pending losses are checked first, so no checkpoint holds weights after a nan step.
    An end-of-epoch save (with ``metrics``) carries the epoch just finished, as
    ``History["epoch"]`` does; a mid-epoch one the running epoch.
    """
    checkpoint = trainer.checkpoint
    if checkpoint is None:
        return
    trainer._check_losses()
    state = checkpoint_state(trainer)
    trainer._call("on_checkpoint_save", state)
    mid_epoch = trainer.batch_idx > 0  # every rank's RNG, and its own loss sums so far
    trainer._resume_point.capture(mid_epoch=mid_epoch, loss=trainer._ledger.state_dict()
                                  if mid_epoch else None)
    if is_main_process() or checkpoint.uses_dcp(state):  # DCP: every rank writes
        epoch = trainer.epoch - 1 if metrics is not None else trainer.epoch
        checkpoint.save(state, step=trainer.global_step, epoch=epoch, metrics=metrics)
    barrier()  # no rank goes on (or reads it) before the file is complete


def restore(trainer: Any, resume: str | Path) -> None:
    """``fit(resume=)``: load the state, take this rank's RNG record, ``on_checkpoint_load``."""
    state = _recipes.load_order(checkpoint_state(trainer))  # groups, then the optimizer
    meta = load(resume, trainer.checkpoint, state, trainer._resume_point)
    if meta is None:
        return
    _log.info("resumed from %s (epoch %d, step %d)", meta["path"], trainer.epoch,
              trainer.global_step)
    own_loss = trainer._resume_point.restore(batch_idx=trainer.batch_idx)
    if own_loss is not None:  # this rank's sums, not rank 0's (what state["loss"] holds)
        trainer._ledger.load_state_dict(own_loss)
    trainer._call("on_checkpoint_load", meta)


def checkpoint_state(trainer: Any) -> dict[str, Any]:
    """What a Trainer checkpoint holds, by name (each object saves its own state)."""
    state: dict[str, Any] = {"model": trainer.model, "optimizer": trainer.optimizer}
    if trainer.scheduler is not None:
        state["scheduler"] = trainer.scheduler
    if trainer.scaler is not None:
        state["scaler"] = trainer.scaler
    state["accumulator"] = trainer.accumulator
    state["trainer"] = trainer
    return state


def load(resume: str | Path, checkpoint: CheckpointManager | None, state: Mapping[str, Any],
         point: ResumePoint) -> dict[str, Any] | None:
    """Load ``resume`` (``"latest"``, ``"best"`` or a path) into ``state``; return its metadata.

    Returns ``None`` when the manager holds no checkpoint yet (training starts afresh).
    The checkpoint's own RNG record is not restored: the trainer's state holds one record
    per rank (see :class:`ResumePoint`), restored by ``point`` when the epoch begins.
    """
    if resume in ("latest", "best"):
        if checkpoint is None:
            raise ValueError(
                f"resume={resume!r} needs Trainer(checkpoint=CheckpointManager(...)); "
                "or pass the path of a checkpoint file"
            )
        checkpoint.refresh()  # under DDP only rank 0 saved: see what it wrote
        if checkpoint.latest() is None:
            _log.info("no checkpoint in %s yet: starting from scratch", checkpoint.directory)
            return None
        meta = checkpoint.load(str(resume), state, restore_rng=False)
    else:
        meta = load_checkpoint(resume, state, restore_rng=False)
    if point.lacks_rng():
        # A single process's checkpoint from torchkit 0.1.0 kept its RNG in the file only.
        load_checkpoint(meta["path"], restore_rng=True)
        point.fill_rng(get_rng_state())
    return meta


def load_callbacks(callbacks: Sequence[Any], saved: Sequence[Mapping[str, Any]]) -> None:
    """Give each callback its saved state; stateless ones need not match in number."""
    if len(saved) != len(callbacks) and not any(saved):
        saved = [{} for _ in callbacks]  # none had state: nothing to lose
    if len(saved) != len(callbacks):
        raise ValueError(
            f"the checkpoint has state for {len(saved)} callbacks but this "
            f"Trainer has {len(callbacks)}; pass the same callbacks, in order"
        )
    for callback, state in zip(callbacks, saved):
        callback.load_state_dict(state)


def upgrade_legacy(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """Turn a Trainer state saved by torchkit 0.1.0 into today's layout; others pass through."""
    if not isinstance(state, Mapping) or set(state) != set(_LEGACY_KEYS):
        return state
    new = {k: state[k] for k in ("epoch", "batch_idx", "should_stop", "stop_reason",
                                 "history", "callbacks", "logger")}
    new["loss"] = {"loss": state["epoch_loss"], "count": state["epoch_count"]}
    if state["rank_rngs"] is not None:  # under DDP: (rng, epoch_rng) of every rank
        new["rng"] = [{"rng": rng, "epoch_rng": epoch_rng}
                      for rng, epoch_rng in state["rank_rngs"]]
    else:
        new["rng"] = [{"rng": None, "epoch_rng": state["epoch_rng"]}]
    return new


class ResumePoint:
    """One RNG record per rank, and where a resumed epoch picks up.

    A record holds the rank's RNG state at the save and, for a save in the middle of an
    epoch, its RNG state as that epoch began: a resumed epoch restores the latter,
    re-creates the DataLoader iterator (the same shuffle), skips the batches already
    trained, and then continues from the former, so the run goes on bitwise as if it
    had never stopped.

    Example:
        >>> point = ResumePoint()
        >>> point.begin_epoch()  # a fresh epoch: its RNG is recorded, nothing is skipped
        0
        >>> point.capture(mid_epoch=True, loss={"loss": torch.tensor(3.0), "count": 2})
        >>> [sorted(record) for record in point.state_dict()]
        [['epoch_rng', 'loss', 'rng']]
    """

    def __init__(self) -> None:
        self._epoch_rng: dict[str, Any] | None = None  # this rank's, as the epoch began
        self._records: list[dict[str, Any]] | None = None  # every rank's, at the last save
        self._pick_up: tuple[int, dict[str, Any]] | None = None  # (batches done, rng)

    def begin_epoch(self) -> int:
        """Start an epoch: return how many batches a resumed one already trained.

        Called before the DataLoader is iterated, so a resumed epoch replays its shuffle.
        """
        if self._pick_up is None:
            self._epoch_rng = get_rng_state()
            return 0
        if self._epoch_rng is not None:
            set_rng_state(self._epoch_rng)
        return self._pick_up[0]

    def skip(self, batches: Iterator[Any], start: int, bar: Any) -> Iterator[Any]:
        """The epoch's batch iterator, past the ``start`` batches a resumed epoch trained.

        They were consumed before the crash: the same order, not trained again; the
        progress ``bar`` counts them. Then the randomness continues from the save.
        """
        for _ in range(start):
            next(batches)
        if start:
            bar.update(start)
        if self._pick_up is not None:
            set_rng_state(self._pick_up[1])
            self._pick_up = None
        return batches

    def capture(self, *, mid_epoch: bool, loss: Mapping[str, Any] | None = None) -> None:
        """Record every rank's RNG (and, mid-epoch, its ``loss`` sums) before a save.

        A collective: every rank calls it. Each rank's own loss sums so far are kept
        because under DDP each rank has summed only its share of the epoch.
        """
        record = {"rng": get_rng_state(), "epoch_rng": self._epoch_rng if mid_epoch else None,
                  "loss": dict(loss) if mid_epoch and loss is not None else None}
        self._records = ddp.gather(record) or [record]

    def restore(self, *, batch_idx: int) -> Mapping[str, Any] | None:
        """After loading: take this rank's record (rank 0's if the world size changed).

        Returns the rank's own loss sums of a mid-epoch save, if the record has them.
        """
        records = self._records or []
        if not records:
            return None
        record = records[get_rank()] if len(records) == get_world_size() else records[0]
        self._epoch_rng = record["epoch_rng"]
        if batch_idx:
            self._pick_up = (batch_idx, record["rng"])
        else:
            set_rng_state(record["rng"])
        loss: Mapping[str, Any] | None = record.get("loss")
        return loss

    def lacks_rng(self) -> bool:
        """Whether a loaded record has no RNG state at the save (see :func:`upgrade_legacy`)."""
        return self._records is not None and any(r["rng"] is None for r in self._records)

    def fill_rng(self, rng: dict[str, Any]) -> None:
        """Give the records that lack one the RNG state at the save."""
        for record in self._records or []:
            if record["rng"] is None:
                record["rng"] = rng

    def state_dict(self) -> list[dict[str, Any]]:
        """Every rank's record from the last :meth:`capture` (this process's if none)."""
        if self._records is None:
            return [{"rng": get_rng_state(), "epoch_rng": self._epoch_rng}]
        return self._records

    def load_state_dict(self, records: list[dict[str, Any]]) -> None:
        """Keep the saved records for :meth:`restore`."""
        self._records = list(records)
