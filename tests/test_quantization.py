"""Quantization helpers on models trained on scikit-learn's digits (CPU, seconds)."""

from __future__ import annotations

import copy
import functools
import re
import subprocess
import sys
import warnings

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import torchkit as tk
from torchkit.quantization import _backend

DEPRECATED = "torch.ao.quantization is deprecated"


# --- data and models, trained once per process ---------------------------------------


@functools.cache
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    return x[train], y[train], x[test], y[test]


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


@functools.cache
def trained_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    x, y, _, _ = digits()
    return fit(model, x, y, epochs=15, lr=3e-3)


def images(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, 1, 8, 8)


@functools.cache
def trained_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 10),
    )
    x, y, _, _ = digits()
    return fit(model, images(x), y, epochs=10, lr=3e-3)


def calibration() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y, _, _ = digits()
    return [(images(x[i : i + 64]), y[i : i + 64]) for i in range(0, 640, 64)]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor], x: torch.Tensor,
                     out_before: torch.Tensor) -> None:
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)  # bitwise
    assert not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(x), out_before, rtol=0, atol=0)


def no_batchnorm(model: nn.Module) -> bool:
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.fixture(autouse=True)
def _notice_already_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    # The eager-backend notice is once per process; test_eager_notice_once checks it.
    monkeypatch.setattr(_backend, "_eager_notice_shown", True)


# --- eager backend ---------------------------------------------------------------------


def test_dynamic_shrinks_and_keeps_accuracy() -> None:
    model = trained_mlp()
    _, _, x, y = digits()
    before, out = snapshot(model), model(x).detach()
    qmodel = tk.quantize_dynamic(model, backend="eager", example_input=x[:4])
    assert tk.model_size(qmodel) <= 0.35 * tk.model_size(model)
    assert abs(accuracy(qmodel, x, y) - accuracy(model, x, y)) <= 0.015
    assert_untouched(model, before, x, out)


def test_static_fuses_conv_bn_relu_and_keeps_accuracy() -> None:
    model = trained_cnn()
    _, _, x, y = digits()
    before, out = snapshot(model), model(images(x)).detach()
    qmodel = tk.quantize_static(model, calibration(), backend="eager")
    assert no_batchnorm(qmodel)
    kinds = [type(m).__name__ for m in qmodel.module.children()]
    assert kinds[:3] == ["ConvReLU2d", "Identity", "Identity"]
    assert tk.model_size(qmodel) <= 0.35 * tk.model_size(model)
    assert abs(accuracy(qmodel, images(x), y) - accuracy(model, images(x), y)) <= 0.015
    assert_untouched(model, before, images(x), out)


def test_qat_keeps_accuracy_and_leaves_float_model() -> None:
    model = trained_cnn()
    x, y, x_test, y_test = digits()
    before, out = snapshot(model), model(images(x_test)).detach()
    qat = tk.prepare_qat(model, backend="eager")
    assert qat.training
    fit(qat, images(x), y, epochs=2, lr=1e-4)
    qat_state = snapshot(qat)
    qmodel = tk.convert_qat(qat)
    torch.testing.assert_close(qat.state_dict(), qat_state, rtol=0, atol=0)
    assert no_batchnorm(qmodel) and not qmodel.training
    assert tk.model_size(qmodel) <= 0.35 * tk.model_size(model)
    change = accuracy(qmodel, images(x_test), y_test) - accuracy(model, images(x_test), y_test)
    assert abs(change) <= 0.015
    assert_untouched(model, before, images(x_test), out)


class Residual(nn.Module):
    """A resnet-style block: one ReLU module called twice, and ``out += identity``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.head(self.relu(out))


def test_static_handles_residual_adds_and_shared_relu() -> None:
    model = Residual().eval()
    batches = [torch.randn(8, 4, 8, 8) for _ in range(4)]
    qmodel = tk.quantize_static(model, batches, backend="eager", num_batches=2)
    assert no_batchnorm(qmodel)
    assert isinstance(qmodel.module.relu, nn.ReLU)  # shared: not fused away
    with torch.no_grad():
        torch.testing.assert_close(qmodel(batches[0]), model(batches[0]), atol=0.1, rtol=0.1)


def test_fuse_none_keeps_batchnorm() -> None:
    qmodel = tk.quantize_static(trained_cnn(), calibration(), backend="eager", fuse="none")
    assert "BatchNorm2d" in {type(m).__name__ for m in qmodel.modules()}


def test_untraceable_model_fuses_inside_sequentials() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Flatten(), nn.Linear(144, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x) if x.shape[0] > 0 else x  # shape branch: fx cannot trace

    qmodel = tk.quantize_static(Branchy().eval(), [torch.randn(4, 1, 8, 8)], backend="eager")
    assert no_batchnorm(qmodel)


def test_quantize_dynamic_lstm() -> None:
    model = nn.LSTM(256, 256, batch_first=True)
    qmodel = tk.quantize_dynamic(model, backend="eager")
    assert type(qmodel).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert tk.model_size(qmodel) <= 0.35 * tk.model_size(model)


def test_static_accepts_dict_batches_and_restores_engine() -> None:
    engine = torch.backends.quantized.engine
    batches = [{"inputs": torch.randn(4, 256), "targets": torch.zeros(4)} for _ in range(2)]
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU()).eval()
    qmodel = tk.quantize_static(model, batches, backend="eager", engine="qnnpack")
    assert torch.backends.quantized.engine == engine
    assert qmodel.engine == "qnnpack"


# --- warnings --------------------------------------------------------------------------


def test_eager_notice_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_backend, "_eager_notice_shown", False)
    model = nn.Linear(256, 256)
    with pytest.warns(FutureWarning, match=r'torchkit\[torchao\].*backend="pt2e"') as caught:
        tk.quantize_dynamic(model, backend="eager")
    ours = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert len(ours) == 1 and ours[0].filename == __file__  # points at the caller
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        tk.quantize_dynamic(model, backend="eager")
        tk.quantize_static(model, [torch.randn(2, 256)], backend="eager")
    assert not [w for w in again if issubclass(w.category, FutureWarning)]


def test_upstream_warnings_pass_through_but_observer_spam_does_not() -> None:
    model = nn.Sequential(nn.Linear(256, 256)).eval()
    with pytest.deprecated_call(match=DEPRECATED) as caught:
        tk.quantize_static(model, [torch.randn(2, 256)], backend="eager")
    assert not [w for w in caught if "reduce_range" in str(w.message)]


_FILTERS = """
import warnings
import torch
from torch import nn
before = list(warnings.filters)
import torchkit as tk
tk.quantize_dynamic(nn.Linear(256, 256), backend="eager")
tk.quantize_static(nn.Linear(256, 256), [torch.randn(2, 256)], backend="eager")
assert warnings.filters == before, [f for f in warnings.filters if f not in before]
warnings.warn("still shown", DeprecationWarning)  # __main__: shown by Python's defaults
"""


def test_torchkit_installs_no_global_warning_filter() -> None:
    result = subprocess.run([sys.executable, "-c", _FILTERS], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "DeprecationWarning: still shown" in result.stderr


def test_small_linears_warn() -> None:
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.warns(UserWarning, match="every quantized nn.Linear is small"):
        tk.quantize_dynamic(model, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="torch.quantize_per", category=UserWarning)
        tk.quantize_dynamic(nn.Sequential(nn.Linear(256, 256)), backend="eager")


def test_import_torchkit_warns_nothing() -> None:
    result = subprocess.run([sys.executable, "-W", "error", "-c", "import torchkit"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


# --- pt2e backend (torchao) ------------------------------------------------------------


@pytest.mark.slow  # torchao: compiles, or re-exports conv-bn patterns (~15 s)
def test_pt2e_static_compiled_keeps_accuracy() -> None:
    model = trained_cnn()
    _, _, x, y = digits()
    before, out = snapshot(model), model(images(x)).detach()
    qmodel = tk.quantize_static(model, calibration(), backend="pt2e")
    assert no_batchnorm(qmodel)
    assert not any(v.dtype == torch.float32 and v.dim() > 1 for v in qmodel.state_dict().values())
    assert tk.model_size(qmodel) <= 0.35 * tk.model_size(model)
    assert abs(accuracy(qmodel, images(x), y) - accuracy(model, images(x), y)) <= 0.015
    copied = copy.deepcopy(qmodel)  # drops the compiled function; recompiles on call
    torch.testing.assert_close(copied(images(x)), qmodel(images(x)))
    assert_untouched(model, before, images(x), out)


def test_pt2e_dynamic_keeps_accuracy() -> None:
    model = trained_mlp()
    _, _, x, y = digits()
    qmodel = tk.quantize_dynamic(model, backend="pt2e", example_input=x[:8], compile=False)
    assert tk.model_size(qmodel) <= 0.35 * tk.model_size(model)
    assert abs(accuracy(qmodel, x, y) - accuracy(model, x, y)) <= 0.015


@pytest.mark.slow  # torchao: compiles, or re-exports conv-bn patterns (~15 s)
def test_pt2e_qat_keeps_accuracy() -> None:
    model = trained_cnn()
    x, y, x_test, y_test = digits()
    qat = tk.prepare_qat(model, backend="pt2e", example_input=images(x[:64]))
    fit(qat, images(x[:640]), y[:640], epochs=1, lr=1e-4)
    qmodel = tk.convert_qat(qat, compile=False)
    assert no_batchnorm(qmodel)
    change = accuracy(qmodel, images(x_test), y_test) - accuracy(model, images(x_test), y_test)
    assert abs(change) <= 0.015


def test_report_on_pt2e_model() -> None:
    model = trained_cnn()
    _, _, x, y = digits()
    qmodel = tk.quantize_static(model, calibration(), backend="pt2e", compile=False)
    report = tk.quantization_report(model, qmodel, [(images(x), y)], num_repeats=2)
    assert report["size_ratio"] <= 0.35
    assert abs(report["accuracy_change"]) <= 0.015
    assert report["latency_ratio"] > 0


# --- report, size -----------------------------------------------------------------------


def test_report_keys_and_values() -> None:
    model = trained_mlp()
    _, _, x, y = digits()
    qmodel = tk.quantize_dynamic(model, backend="eager")
    size_only = tk.quantization_report(model, qmodel)
    assert set(size_only) == {"float_bytes", "quantized_bytes", "size_ratio"}
    assert size_only["float_bytes"] == tk.model_size(model)
    model.train()
    report = tk.quantization_report(model, qmodel, example_input=x[:1], num_repeats=2)
    assert model.training and report["latency_ratio"] > 0  # mode restored
    model.eval()
    batches = [(x[:200], y[:200]), {"inputs": x[200:], "targets": y[200:]}]
    report = tk.quantization_report(model, qmodel, batches, num_repeats=2)
    assert report["float_accuracy"] == pytest.approx(accuracy(model, x, y))
    assert report["accuracy_change"] == pytest.approx(
        report["quantized_accuracy"] - report["float_accuracy"])


def test_model_size_looks_through_compile() -> None:
    model = nn.Linear(10, 10)
    assert tk.model_size(torch.compile(model)) == tk.model_size(model)


# --- errors -----------------------------------------------------------------------------


def test_backend_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Linear(256, 256)
    with pytest.raises(ValueError, match="backend must be one of"):
        tk.quantize_dynamic(model, backend="fx")  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(ImportError, match=re.escape('pip install "torchkit[torchao]"')):
        tk.quantize_dynamic(model, backend="pt2e", example_input=torch.randn(1, 256))
    monkeypatch.setattr(_backend, "eager_available", lambda: False)
    with pytest.raises(ImportError, match=r"needs torch.ao.quantization eager mode.* no longer"):
        tk.quantize_dynamic(model, backend="eager")
    monkeypatch.setattr(_backend, "pt2e_available", lambda: False)
    with pytest.raises(ImportError, match=r"no quantization backend is available.*torchao\]"):
        tk.quantize_dynamic(model)


def test_eager_unavailable_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _backend.eager_available() and _backend.pt2e_available()
    monkeypatch.setitem(sys.modules, "torch.ao.quantization", None)
    assert not _backend.eager_available()


def test_argument_errors() -> None:
    model = nn.Linear(256, 256)
    x = torch.randn(2, 256)
    cases = [
        (TypeError, "model must be an nn.Module", lambda: tk.quantize_dynamic("net")),
        (TypeError, "modules must be a tuple",
         lambda: tk.quantize_dynamic(model, modules=nn.Linear)),
        (TypeError, "non-empty tuple", lambda: tk.quantize_dynamic(model, modules=(int,))),
        (ValueError, "dtype must be", lambda: tk.quantize_dynamic(model, dtype=torch.int8)),
        (TypeError, "compile must be a bool", lambda: tk.quantize_dynamic(model, compile=1)),
        (TypeError, "example_input must be a tensor",
         lambda: tk.quantize_dynamic(model, example_input=[1])),
        (ValueError, "compile=True applies to backend='pt2e'",
         lambda: tk.quantize_dynamic(model, backend="eager", compile=True)),
        (ValueError, "pass example_input", lambda: tk.quantize_dynamic(model, backend="pt2e")),
        (ValueError, "pass example_input", lambda: tk.prepare_qat(model, backend="pt2e")),
        (ValueError, "fuse must be 'auto' or 'none'",
         lambda: tk.quantize_static(model, [x], fuse="yes")),
        (ValueError, "engine must be one of", lambda: tk.quantize_static(model, [x], engine="arm")),
        (ValueError, "engine must be 'x86'",
         lambda: tk.quantize_static(model, [x], backend="pt2e", engine="qnnpack")),
        (ValueError, "always folds BatchNorm",
         lambda: tk.quantize_static(model, [x], backend="pt2e", fuse="none")),
        (ValueError, "always folds BatchNorm",
         lambda: tk.prepare_qat(model, backend="pt2e", fuse="none", example_input=x)),
        (TypeError, "calibration_data must be an iterable", lambda: tk.quantize_static(model, x)),
        (ValueError, "yielded no batches", lambda: tk.quantize_static(model, [])),
        (ValueError, "num_batches must be", lambda: tk.quantize_static(model, [x], num_batches=0)),
        (TypeError, r"got a dict with keys \['x'\]", lambda: tk.quantize_static(model, [{"x": x}])),
        (TypeError, r"got a tuple of \['int'\]", lambda: tk.quantize_static(model, [(1,)])),
        (TypeError, "got a str", lambda: tk.quantize_static(model, ["x"])),
        (TypeError, "convert_qat expects the model returned by tk.prepare_qat",
         lambda: tk.convert_qat(model)),
        (TypeError, "model must be an nn.Module", lambda: tk.model_size(None)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()


def test_pt2e_dynamic_errors() -> None:
    x = torch.randn(2, 8, 256)
    with pytest.raises(ValueError, match=r"dtype must be torch.qint8.*LSTM layers"):
        tk.quantize_dynamic(nn.LSTM(256, 256), dtype=torch.float16, backend="pt2e",
                            example_input=x)
    with pytest.raises(ValueError, match="modules must include nn.Linear"):
        tk.quantize_dynamic(nn.Linear(256, 256), modules=(nn.GRU,), backend="pt2e",
                            example_input=x)


def test_engine_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(type(torch.backends.quantized), "supported_engines",
                        property(lambda self: ["qnnpack"]))
    with pytest.raises(ValueError, match="'x86' is not supported by this torch build"):
        tk.quantize_static(nn.Linear(256, 256), [torch.randn(2, 256)], backend="eager")


def test_qat_convert_compile_error() -> None:
    qat = tk.prepare_qat(nn.Sequential(nn.Linear(256, 256)), backend="eager")
    with pytest.raises(ValueError, match="compile=True needs a model prepared with"):
        tk.convert_qat(qat, compile=True)


class Exp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.fc(x))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_unquantizable_models_explain() -> None:
    x = torch.randn(2, 256)
    with pytest.raises(RuntimeError, match="fails on a calibration batch.*backend='pt2e'"):
        tk.quantize_static(Exp().eval(), [x], backend="eager")
    with pytest.raises(RuntimeError, match="fails on a calibration batch"):
        tk.quantize_dynamic(Exp(), backend="eager", example_input=torch.randn(2, 3))
    with pytest.raises(RuntimeError, match=r"could not capture.*backend='eager'"):
        tk.quantize_static(DataDependent().eval(), [x], backend="pt2e")


def test_report_errors() -> None:
    model = nn.Linear(256, 256)
    q = tk.quantize_dynamic(model, backend="eager")
    x = torch.randn(2, 256)
    with pytest.raises(TypeError, match="float_model must be an nn.Module"):
        tk.quantization_report(None, q)
    with pytest.raises(ValueError, match="num_repeats must be a positive int"):
        tk.quantization_report(model, q, num_repeats=0)
    with pytest.raises(ValueError, match="measures on CPU, but float_model is on"):
        tk.quantization_report(nn.Linear(2, 2, device="meta"), q)
    with pytest.raises(TypeError, match="example_input must be a tensor"):
        tk.quantization_report(model, q, example_input=[1.0])
    with pytest.raises(ValueError, match="data yielded no batches"):
        tk.quantization_report(model, q, [])
    with pytest.raises(TypeError, match="accuracy needs batches of"):
        tk.quantization_report(model, q, [x], num_repeats=1)
