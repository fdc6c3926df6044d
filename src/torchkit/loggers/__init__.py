"""Experiment loggers: metrics to TensorBoard, a CSV file, MLflow or W&B, resumable.

A logger receives ``log_metrics({"train_loss": 0.3, "lr": 0.01}, step)`` calls at log
time (never per step on the device: values are read to the host here), hyperparameters
once at the end of training, and survives a crash: its :meth:`Logger.state_dict` goes
into the checkpoint, and after ``load_state_dict`` whatever the crashed run logged past
the checkpoint is discarded, so a resumed run logs no step twice. Subclass
:class:`Logger` to send metrics anywhere else.
"""

from __future__ import annotations

from torchkit.loggers._base import Logger
from torchkit.loggers._csv import CSVLogger
from torchkit.loggers._mlflow import MLflowLogger
from torchkit.loggers._tensorboard import TensorBoardLogger
from torchkit.loggers._wandb import WandbLogger

__all__ = ["CSVLogger", "Logger", "MLflowLogger", "TensorBoardLogger", "WandbLogger"]
