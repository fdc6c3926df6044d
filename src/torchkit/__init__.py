"""torchkit: composable, framework-free PyTorch training pieces."""

from torchkit import vision as vision
from torchkit._version import __version__
from torchkit.accumulation import GradAccumulator
from torchkit.averaging import SWA, ModelEMA, update_bn
from torchkit.callbacks import Callback, Throughput, TimeLimit, UnfreezeSchedule
from torchkit.checkpoint import (
    CheckpointError,
    CheckpointManager,
    consolidate_checkpoint,
    extract_weights,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
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
from torchkit.schedules import warmup_constant, warmup_cosine, warmup_linear
from torchkit.state import (
    Stateful,
    get_rng_state,
    loader_generator,
    seed_everything,
    seed_worker,
    set_rng_state,
)
from torchkit.surgery import (
    LayerSummary,
    ModelSummary,
    checkpoint_activations,
    count_parameters,
    find_head,
    freeze,
    init_weights,
    insert_after,
    insert_before,
    param_groups,
    replace_head,
    summary,
    trainable_parameters,
    unfreeze,
)
from torchkit.trainer import History, Trainer
from torchkit.tuning import LRFinderResult, find_lr

__all__ = [
    "SWA",
    "CSVLogger",
    "Callback",
    "Captured",
    "CheckpointError",
    "CheckpointManager",
    "ConfusionMatrix",
    "EarlyStopping",
    "GradAccumulator",
    "History",
    "LRFinderResult",
    "LaunchError",
    "LayerSummary",
    "Logger",
    "MLflowLogger",
    "Metric",
    "ModelEMA",
    "ModelSummary",
    "ProgressBar",
    "PruningSchedule",
    "Stateful",
    "TensorBoardLogger",
    "Throughput",
    "TimeLimit",
    "Trainer",
    "UnfreezeSchedule",
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
    "extract_weights",
    "feature_grid",
    "find_head",
    "find_lr",
    "freeze",
    "get_rank",
    "get_rng_state",
    "get_world_size",
    "grad_cam",
    "grad_norm",
    "init_weights",
    "insert_after",
    "insert_before",
    "is_main_process",
    "launch",
    "load_checkpoint",
    "load_weights",
    "loader_generator",
    "misclassified",
    "model_size",
    "param_groups",
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
    "save_weights",
    "seed_everything",
    "seed_worker",
    "set_rng_state",
    "sparsity",
    "summary",
    "trainable_parameters",
    "unfreeze",
    "update_bn",
    "warmup_constant",
    "warmup_cosine",
    "warmup_linear",
]
