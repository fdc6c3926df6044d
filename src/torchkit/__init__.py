"""torchkit: composable, framework-free PyTorch training pieces."""

from torchkit._version import __version__
from torchkit.accumulation import GradAccumulator
from torchkit.callbacks import Callback
from torchkit.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    save_checkpoint,
)
from torchkit.clipping import clip_grad_adaptive, clip_grad_norm, clip_grad_value, grad_norm
from torchkit.early_stopping import EarlyStopping
from torchkit.state import Stateful, get_rng_state, seed_everything, set_rng_state

__all__ = [
    "Callback",
    "CheckpointError",
    "CheckpointManager",
    "EarlyStopping",
    "GradAccumulator",
    "Stateful",
    "__version__",
    "clip_grad_adaptive",
    "clip_grad_norm",
    "clip_grad_value",
    "get_rng_state",
    "grad_norm",
    "load_checkpoint",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]
