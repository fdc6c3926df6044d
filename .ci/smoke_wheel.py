"""Smoke test of an installed torchkit wheel: run from outside the source tree."""

import importlib.metadata
import importlib.resources

import torch
from torch import nn

import torchkit

assert torchkit.__version__ == importlib.metadata.version("torchkit"), torchkit.__version__
assert importlib.resources.files("torchkit").joinpath("py.typed").is_file(), "no py.typed"

torch.manual_seed(0)
model = nn.Linear(4, 2)
before = model.weight.detach().clone()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
accum = torchkit.GradAccumulator(opt, steps=1)
x = torch.randn(8, 4)
with accum.accumulate():
    loss = model(x).pow(2).mean()
    stepped = accum.backward(loss, batch_size=len(x))
assert stepped, "GradAccumulator(steps=1).backward did not step the optimizer"
assert not torch.equal(model.weight, before), "the optimizer step did not change the weights"
print(f"smoke test passed: torchkit {torchkit.__version__} from {torchkit.__file__}")
