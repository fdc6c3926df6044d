"""Model surgery for transfer learning: freeze, replace the head, insert layers, inspect.

Every function works on any ``nn.Module`` by qualified names (``"layer4.1.conv2"``),
changes the model in place and returns it (or the new module, where it says so). The
implementation is split over private modules; this package is the public path, and
every name is re-exported from ``torchkit``.
"""

from __future__ import annotations

from torchkit.surgery._editing import checkpoint_activations, insert_after, insert_before
from torchkit.surgery._freezing import count_parameters, freeze, trainable_parameters, unfreeze
from torchkit.surgery._groups import param_groups
from torchkit.surgery._heads import find_head, replace_head
from torchkit.surgery._init import init_weights
from torchkit.surgery._summary import LayerSummary, ModelSummary, summary

__all__ = [
    "LayerSummary",
    "ModelSummary",
    "checkpoint_activations",
    "count_parameters",
    "find_head",
    "freeze",
    "init_weights",
    "insert_after",
    "insert_before",
    "param_groups",
    "replace_head",
    "summary",
    "trainable_parameters",
    "unfreeze",
]
