"""torchkit: composable, framework-free PyTorch training pieces."""

from torchkit import vision as vision
from torchkit._version import __version__
from torchkit.accumulation import GradAccumulator
from torchkit.callbacks import Callback
from torchkit.checkpoint import (
    CheckpointError,
    CheckpointManager,
    consolidate_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from torchkit.clipping import clip_grad_adaptive, clip_grad_norm, clip_grad_value, grad_norm
from torchkit.distributed import (
    LaunchError,
    all_reduce_mean,
    barrier,
    get_rank,
    get_world_size,
    is_main_process,
    launch,
)
from torchkit.early_stopping import EarlyStopping
from torchkit.inspection import Captured, capture, feature_grid, grad_cam, misclassified
from torchkit.loggers import CSVLogger, Logger, MLflowLogger, TensorBoardLogger, WandbLogger
from torchkit.metrics import ConfusionMatrix, Metric, accuracy
from torchkit.plotting import plot_samples
from torchkit.progress import ProgressBar
from torchkit.pruning import PruningSchedule, prune, remove_pruning, restore_pruning, sparsity
from torchkit.quantization import (
    convert_qat,
    model_size,
    prepare_qat,
    quantization_report,
    quantize_dynamic,
    quantize_static,
)
from torchkit.state import Stateful, get_rng_state, seed_everything, set_rng_state
from torchkit.surgery import (
    LayerSummary,
    ModelSummary,
    checkpoint_activations,
    count_parameters,
    find_head,
    freeze,
    insert_after,
    insert_before,
    replace_head,
    summary,
    trainable_parameters,
    unfreeze,
)
from torchkit.trainer import History, Trainer

__all__ = [
    "CSVLogger",
    "Captured",
    "Callback",
    "CheckpointError",
    "CheckpointManager",
    "ConfusionMatrix",
    "EarlyStopping",
    "GradAccumulator",
    "History",
    "LaunchError",
    "LayerSummary",
    "Logger",
    "MLflowLogger",
    "Metric",
    "ModelSummary",
    "ProgressBar",
    "PruningSchedule",
    "Stateful",
    "TensorBoardLogger",
    "Trainer",
    "WandbLogger",
    "__version__",
    "accuracy",
    "all_reduce_mean",
    "barrier",
    "capture",
    "checkpoint_activations",
    "clip_grad_adaptive",
    "clip_grad_norm",
    "clip_grad_value",
    "consolidate_checkpoint",
    "convert_qat",
    "count_parameters",
    "feature_grid",
    "find_head",
    "freeze",
    "get_rank",
    "get_rng_state",
    "get_world_size",
    "grad_cam",
    "grad_norm",
    "insert_after",
    "insert_before",
    "is_main_process",
    "launch",
    "load_checkpoint",
    "misclassified",
    "model_size",
    "plot_samples",
    "prepare_qat",
    "prune",
    "quantization_report",
    "quantize_dynamic",
    "quantize_static",
    "remove_pruning",
    "replace_head",
    "restore_pruning",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "sparsity",
    "summary",
    "trainable_parameters",
    "unfreeze",
]
