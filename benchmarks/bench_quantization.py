"""Int8 against fp32: latency and size ratios, torchkit's eager and pt2e backends side by side.

Three models (a wide MLP, a small conv net and torchvision's resnet18 with random
weights: nothing is downloaded) are quantized by each backend (dynamic for the MLP,
static with calibration for the conv nets). Latency is the median over interleaved
calls of the fp32 and the int8 model (``tk.quantization_report``), on one CPU thread,
at batch 1 and batch 32; pt2e models are compiled by inductor on their warm-up call.

    python benchmarks/bench_quantization.py [--repeats 10] [--image-size 128]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

import torchkit as tk


def wide_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                         nn.Linear(2048, 10))


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )


def resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None)


def quantize(model: nn.Module, shape: tuple[int, ...], backend: str, dynamic: bool) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    if dynamic:
        return tk.quantize_dynamic(model, backend=backend, example_input=torch.randn(8, *shape))
    batches = [torch.randn(8, *shape, generator=g) for _ in range(4)]
    return tk.quantize_static(model, batches, backend=backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the benchmark prints figures, not deprecation notices
    size = args.image_size
    cases = [
        ("wide MLP 1024-2048-2048-10", wide_mlp, (1024,), True),
        ("conv net (3 conv-bn-relu), 32x32", conv_net, (3, 32, 32), False),
        (f"torchvision resnet18, {size}x{size}", resnet18, (3, size, size), False),
    ]
    print(f"torch {torch.__version__}, 1 thread, {args.repeats} interleaved repeats")
    print()
    print("| model | backend | mode | size ratio | latency ratio, batch 1 | batch 32 |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for name, make, shape, dynamic in cases:
        torch.manual_seed(0)
        model = make().eval()
        for backend in ("eager", "pt2e"):
            int8 = quantize(model, shape, backend, dynamic)
            ratios = []
            for batch in (1, 32):
                x = torch.randn(batch, *shape)
                report = tk.quantization_report(model, int8, example_input=x,
                                                num_repeats=args.repeats)
                ratios.append(report["latency_ratio"])
            print(f"| {name} | {backend} | {'dynamic' if dynamic else 'static'} | "
                  f"{report['size_ratio']:.2f} | {ratios[0]:.2f} | {ratios[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
