"""torchkit: composable, framework-free PyTorch training pieces."""

from torchkit._version import __version__
from torchkit.accumulation import GradAccumulator
from torchkit.clipping import clip_grad_adaptive, clip_grad_norm, clip_grad_value, grad_norm
from torchkit.early_stopping import EarlyStopping
from torchkit.state import Stateful

__all__ = [
    "EarlyStopping",
    "GradAccumulator",
    "Stateful",
    "__version__",
    "clip_grad_adaptive",
    "clip_grad_norm",
    "clip_grad_value",
    "grad_norm",
]
