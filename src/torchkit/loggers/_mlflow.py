"""MLflowLogger: metrics, parameters and final metrics in one MLflow run that resumes."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from torchkit._utils import check_keys, require
from torchkit.distributed import is_main_process
from torchkit.loggers._base import Logger, check_hparams, check_metrics, check_run_state

__all__ = ["MLflowLogger"]

_log = logging.getLogger(__name__)


class MLflowLogger(Logger):
    """Log metrics into one MLflow run that a resumed ``fit`` continues (``mlflow`` extra).

    Each metric is logged at its ``step`` through :class:`mlflow.tracking.MlflowClient`
    (no global active run is touched); the run is created at the first write, in the
    experiment named ``experiment`` (created if needed). :meth:`state_dict` holds the run
    id and the last logged step, so after ``load_state_dict`` the same run goes on.
    MLflow cannot delete logged points: a ``(metric, step)`` pair that the crashed run
    already logged past the checkpoint is not logged again (with torchkit's exact
    resume it holds the same value), so no step of the run appears twice.
    :meth:`log_hparams` logs parameters (strings, as MLflow keeps them; a parameter
    already in the run with the same value is skipped, one with another value is kept
    and warned about, as MLflow parameters cannot change) and each final metric as
    ``hparam/<name>`` at the last logged step. Only the main process (rank 0) writes.

    Args:
        experiment: The experiment's name.
        tracking_uri: Where runs go, e.g. ``"http://host:5000"`` or
            ``"sqlite:///path/mlflow.db"``. ``None`` means a local store in ``mlruns/``
            under the working directory: ``mlruns/mlflow.db`` (sqlite) with artifacts in
            ``mlruns/artifacts`` (view it with
            ``mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db``).
        run_id: An existing run to continue; ``None`` starts a new one.

    Raises:
        ImportError: If mlflow is not installed.
        TypeError: If ``experiment`` is not a non-empty string or ``run_id`` not a string.

    Example:
        >>> import tempfile
        >>> uri = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"
        >>> with tk.MLflowLogger("demo", tracking_uri=uri) as logger:
        ...     logger.log_metrics({"train_loss": 0.5}, step=0)
        ...     logger.log_metrics({"train_loss": 0.25}, step=1)
        >>> logger.state_dict()["step"]
        1
        >>> from mlflow.tracking import MlflowClient
        >>> history = MlflowClient(uri).get_metric_history(logger.run_id, "train_loss")
        >>> [(m.step, m.value) for m in history]
        [(0, 0.5), (1, 0.25)]
    """

    def __init__(
        self, experiment: str, *, tracking_uri: str | None = None, run_id: str | None = None
    ) -> None:
        require("mlflow", extra="mlflow")
        errors = []
        if not isinstance(experiment, str) or not experiment:
            errors.append(f"experiment must be a non-empty string, got {experiment!r}")
        if tracking_uri is not None and not isinstance(tracking_uri, str):
            errors.append(f"tracking_uri must be a string or None, got {tracking_uri!r}")
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            errors.append(f"run_id must be a non-empty string or None, got {run_id!r}")
        if errors:
            raise TypeError("MLflowLogger: " + "; ".join(errors))
        self.experiment = experiment
        self._default_store = tracking_uri is None
        if tracking_uri is None:
            tracking_uri = f"sqlite:///{(Path('mlruns') / 'mlflow.db').resolve().as_posix()}"
        self.tracking_uri = tracking_uri
        self._run_id = run_id
        self._client: Any = None
        self._step: int | None = None
        self._resume_after: int | None = None  # set by load_state_dict, used at opening
        self._already_logged: set[tuple[str, int]] = set()
        self._closed = False

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id (``None`` until the first write of a new run)."""
        return self._run_id

    def _open(self) -> Any:
        if self._closed:
            raise RuntimeError(f"this MLflowLogger (run {self._run_id}) is closed")
        if self._client is not None:
            return self._client
        tracking = require("mlflow.tracking", extra="mlflow")
        if self._default_store:
            Path("mlruns").mkdir(exist_ok=True)
        client = tracking.MlflowClient(self.tracking_uri)
        if self._run_id is None:
            found = client.get_experiment_by_name(self.experiment)
            if found is not None:
                experiment_id = found.experiment_id
            else:
                location = (Path("mlruns") / "artifacts").resolve().as_uri() \
                    if self._default_store else None
                experiment_id = client.create_experiment(self.experiment,
                                                         artifact_location=location)
            self._run_id = client.create_run(experiment_id).info.run_id
            _log.info("MLflow run %s in experiment %r at %s", self._run_id, self.experiment,
                      self.tracking_uri)
        else:
            run = client.get_run(self._run_id)  # raises if there is no such run
            if run.info.status != "RUNNING":
                client.update_run(self._run_id, status="RUNNING")
            if self._resume_after is not None:
                self._already_logged = _logged_after(client, run, self._resume_after)
                _log.info("resuming MLflow run %s after step %d (%d points already logged "
                          "past it are kept)", self._run_id, self._resume_after,
                          len(self._already_logged))
        self._resume_after = None
        self._client = client
        return client

    def _log_points(self, values: Mapping[str, float], step: int) -> None:
        entities = require("mlflow.entities", extra="mlflow")
        now_ms = int(time.time() * 1000)
        points = [entities.Metric(name, value, now_ms, step) for name, value in values.items()
                  if (name, step) not in self._already_logged]
        if points:
            self._open().log_batch(self._run_id, metrics=points)

    def log_metrics(self, metrics: Mapping[str, float | torch.Tensor], step: int) -> None:
        """Log each metric at ``step`` (on rank 0; other ranks only validate).

        Raises:
            TypeError: If a name, value or ``step`` is invalid (nothing is logged).
            RuntimeError: If the logger is closed.
        """
        values = check_metrics(metrics, step, owner=f"{type(self).__name__}.log_metrics")
        if not is_main_process():
            return
        self._open()
        self._log_points(values, step)
        self._step = step if self._step is None else max(self._step, step)

    def log_hparams(
        self, hparams: Mapping[str, Any], metrics: Mapping[str, float | torch.Tensor]
    ) -> None:
        """Log ``hparams`` as run parameters and ``metrics`` as ``hparam/<name>``.

        The metrics go at the last logged step (``0`` if none). A parameter the run
        already has with the same value is skipped (a resumed run logs them again);
        with a different value it keeps the old one and warns (MLflow parameters are
        immutable).

        Raises:
            TypeError: If ``hparams`` is not a mapping with string keys, or a metric is
                invalid.
            RuntimeError: If the logger is closed.
        """
        step = 0 if self._step is None else self._step
        values = check_hparams(hparams, metrics, step,
                               owner=f"{type(self).__name__}.log_hparams")
        if not is_main_process():
            return
        client = self._open()
        existing = client.get_run(self._run_id).data.params
        params = {name: _param(value) for name, value in hparams.items()}
        changed = sorted(name for name, value in params.items()
                         if name in existing and existing[name] != value)
        if changed:
            warnings.warn(
                f"MLflow run {self._run_id} already has parameters "
                + ", ".join(f"{n}={existing[n]!r} (now {params[n]!r})" for n in changed)
                + "; MLflow parameters cannot change, so the old values are kept",
                stacklevel=2,
            )
        entities = require("mlflow.entities", extra="mlflow")
        new = [entities.Param(name, value) for name, value in params.items()
               if name not in existing]
        if new:
            client.log_batch(self._run_id, params=new)
        finals = {f"hparam/{name}": value for name, value in values.items()}
        self._log_points(finals, step)
        self._already_logged.update((name, step) for name in finals)  # once per step

    def close(self) -> None:
        """Mark the run finished; later writes raise ``RuntimeError``."""
        if self._client is not None and is_main_process():
            self._client.set_terminated(self._run_id, status="FINISHED")
        self._client = None
        self._closed = True

    def state_dict(self) -> dict[str, Any]:
        """Return ``{"run_id": the run's id, "step": the last logged step or None}``.

        On rank 0 this starts the run if nothing was logged yet, so that a checkpoint
        saved before the first log names the run its resumed ``fit`` continues (other
        ranks, which never write, return ``"run_id": None``).
        """
        if self._run_id is None and not self._closed and is_main_process():
            self._open()
        return {"run_id": self._run_id, "step": self._step}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue the checkpoint's run after its last step; see the class docstring.

        Raises:
            KeyError: If keys are missing or unexpected.
            TypeError: If ``run_id`` is not a string or ``None``, or ``step`` not an int
                or ``None``.
            RuntimeError: If the logger is closed.
        """
        check_keys(state_dict, expected=("run_id", "step"), owner=type(self).__name__)
        run_id, step = state_dict["run_id"], state_dict["step"]
        check_run_state(type(self).__name__, run_id, step)
        if self._closed:
            raise RuntimeError(f"this MLflowLogger (run {self._run_id}) is closed")
        if run_id is not None:
            self._run_id = run_id
        self._step = step
        self._client = None  # reopened at the next write, reading what the run holds
        self._already_logged = set()
        self._resume_after = -1 if step is None else step

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.experiment!r}, run_id={self._run_id!r}, "
                f"step={self._step})")


def _logged_after(client: Any, run: Any, step: int) -> set[tuple[str, int]]:
    """The ``(metric, step)`` pairs the run holds at steps after ``step``."""
    return {
        (key, point.step)
        for key in run.data.metrics
        for point in client.get_metric_history(run.info.run_id, key)
        if point.step > step
    }


def _param(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return str(value)
