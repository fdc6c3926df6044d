"""Loggers: TensorBoard event files read back with tensorboard itself, CSV with csv, resume."""

from __future__ import annotations

import csv
import io
import logging
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from tensorboard.summary.writer import event_file_writer
from torch import nn

import torchkit as tk


@pytest.fixture(autouse=True)
def _ordered_event_files(monkeypatch):
    # Event files are read in name order: time in seconds, host, pid, then a process-wide
    # counter. Two files made in the same second would sort 9 after 10; a counter with a
    # fixed number of digits keeps creation order (a real resume starts seconds later).
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(10**6))


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --- Logger base ----------------------------------------------------------------------


def test_base_logger_defaults_and_context_manager():
    closed = []

    class Minimal(tk.Logger):
        def log_metrics(self, metrics, step):
            pass

        def close(self):
            closed.append(True)

    with Minimal() as logger:
        logger.log_hparams({"lr": 0.1}, {"acc": 1.0})
        assert logger.log_graph(nn.Linear(1, 1), torch.zeros(1, 1)) is False
        logger.flush()
        assert logger.state_dict() == {}
        logger.load_state_dict({})
    assert closed == [True]
    with pytest.raises(KeyError, match=r"unexpected keys \['step'\]"):
        logger.load_state_dict({"step": 3})
    with pytest.raises(NotImplementedError, match="Logger must override log_metrics"):
        tk.Logger().log_metrics({"a": 1.0}, 0)
    tk.Logger().close()


# --- TensorBoardLogger ----------------------------------------------------------------


def test_tensorboard_scalars_read_back(tmp_path):
    with tk.TensorBoardLogger(tmp_path / "run") as logger:
        for step in range(3):
            logger.log_metrics({"train_loss": 1.0 / (step + 1), "lr": torch.tensor(0.1)}, step)
        logger.log_metrics({"val_acc": 0.75}, step=2)
        assert logger.state_dict() == {"step": 2}
    found = scalars(tmp_path / "run")
    assert set(found) == {"train_loss", "lr", "val_acc"}
    assert [s for s, _ in found["train_loss"]] == [0, 1, 2]
    assert [v for _, v in found["train_loss"]] == pytest.approx([1.0, 0.5, 1 / 3])
    assert found["lr"] == [(s, pytest.approx(0.1)) for s in range(3)]
    assert found["val_acc"] == [(2, 0.75)]
    assert repr(logger) == f"TensorBoardLogger({str(tmp_path / 'run')!r}, step=2)"


def test_tensorboard_hparams_go_into_the_same_run(tmp_path):
    with tk.TensorBoardLogger(tmp_path) as logger:
        logger.log_metrics({"val_acc": 0.5}, step=4)
        logger.log_hparams(
            {"lr": 0.01, "batch_size": 64, "optimizer": "adam", "amp": True, "sched": None,
             "betas": (0.9, 0.99), "wd": torch.tensor(0.5)},
            {"val_acc": 0.9},
        )
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # no timestamped sub-run
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["lr"].number_value == 0.01
    assert hparams["batch_size"].number_value == 64
    assert hparams["optimizer"].string_value == "adam"
    assert hparams["sched"].string_value == "None"
    assert hparams["betas"].string_value == "(0.9, 0.99)"
    assert hparams["wd"].number_value == 0.5
    assert scalars(tmp_path)["hparam/val_acc"] == [(4, pytest.approx(0.9))]


def test_tensorboard_graph_written_whenever_called(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    for option in (True, False):
        # log_graph= only decides whether Trainer logs the graph by itself (graph_on_fit);
        # an explicit call always writes it.
        with tk.TensorBoardLogger(tmp_path / str(option), log_graph=option) as logger:
            assert logger.graph_on_fit is option
            assert logger.log_graph(model, torch.randn(2, 4)) is True
        events = EventAccumulator(str(tmp_path / str(option)))
        events.Reload()
        assert events.Tags()["graph"] is True
        ops = {node.op for node in events.Graph().node}
        assert any("Linear" in op or "linear" in op for op in ops)
    with tk.TensorBoardLogger(tmp_path / "none") as logger:
        logger.log_metrics({"a": 1.0}, 0)
    events = EventAccumulator(str(tmp_path / "none"))
    events.Reload()
    assert events.Tags()["graph"] is False


def decode(event) -> Image.Image:
    return Image.open(io.BytesIO(event.encoded_image_string))


def test_tensorboard_everything_written_reads_back(tmp_path):
    """Images, histograms, figures, the graph, scalars and hparams, all in one run."""
    from matplotlib.figure import Figure

    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 2))
    inputs = torch.rand(3, 1, 6, 6)
    model(inputs).sum().backward()
    fig = Figure(figsize=(2, 1.5), dpi=50)
    fig.add_subplot().plot([0, 1], [1, 0])
    with tk.TensorBoardLogger(tmp_path) as logger:
        logger.log_metrics({"loss": 0.5}, step=1)
        logger.log_images("inputs", inputs, step=1)
        with tk.capture(model, "1") as feats:
            model(inputs)
        logger.log_images("relu", tk.feature_grid(feats["1"], ncols=3), step=2)
        logger.log_images("one", (inputs[0] * 255).to(torch.uint8), step=2)
        tags = logger.log_histograms(model, step=3)
        logger.log_histograms(model, step=4, include="0", grads=False)
        logger.log_figure("curve", fig, step=3)
        logger.log_graph(model, inputs)
        logger.log_hparams({"lr": 0.1}, {"acc": 0.75})
        assert logger.state_dict() == {"step": 4}
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    found = events.Tags()
    assert set(found["images"]) == {"inputs", "relu", "one", "curve"}
    (relu,) = events.Images("relu")
    assert relu.step == 2
    with decode(relu) as image:  # one image per sample, tiled side by side by TensorBoard
        assert image.format == "PNG" and image.height == 2 * (4 + 1) - 1
    (one,) = events.Images("one")
    with decode(one) as image:
        pixels = torch.tensor(np.asarray(image.convert("L")), dtype=torch.float32)
        torch.testing.assert_close(pixels, (inputs[0, 0] * 255).to(torch.uint8).float())
    (curve,) = events.Images("curve")
    assert (curve.step, curve.width, curve.height) == (3, 100, 75)
    assert tags == ["parameters/0.weight", "gradients/0.weight", "parameters/0.bias",
                    "gradients/0.bias", "parameters/3.weight", "gradients/3.weight",
                    "parameters/3.bias", "gradients/3.bias"]
    assert set(found["histograms"]) == set(tags)
    weight = model[0].weight.detach()
    (histogram,) = events.Histograms("parameters/0.weight")[:1]
    value = histogram.histogram_value
    assert value.num == weight.numel()
    assert (value.min, value.max) == pytest.approx((float(weight.min()), float(weight.max())))
    assert value.sum == pytest.approx(float(weight.sum()), abs=1e-5)
    assert [h.step for h in events.Histograms("parameters/0.weight")] == [3, 4]
    assert [h.step for h in events.Histograms("gradients/0.weight")] == [3]
    assert events.Histograms("gradients/0.weight")[0].histogram_value.sum == pytest.approx(
        float(model[0].weight.grad.sum()), abs=1e-4)
    assert found["graph"] is True
    assert scalars(tmp_path)["loss"] == [(1, 0.5)]
    assert scalars(tmp_path)["hparam/acc"] == [(4, 0.75)]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


def test_tensorboard_image_histogram_figure_errors(tmp_path):
    with tk.TensorBoardLogger(tmp_path) as logger:
        with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\], got values "
                                             r"in \[-1, 2\]; undo the normalisation"):
            logger.log_images("x", torch.tensor([-1.0, 2.0]).view(1, 1, 1, 2), step=0)
        with pytest.raises(ValueError, match=r"with C = 1 or 3, got \(2, 8, 4, 4\); show a "
                                             r"feature map with tk.feature_grid"):
            logger.log_images("x", torch.rand(2, 8, 4, 4), step=0)
        with pytest.raises(TypeError, match=r"log_images: tag must be a non-empty string, got "
                                            r"''; step must be an int >= 0, got -1"):
            logger.log_images("", torch.rand(1, 3, 2, 2), step=-1)
        with pytest.raises(TypeError, match="images must be a tensor, got list"):
            logger.log_images("x", [0.5], step=0)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="figure must be a matplotlib Figure, got str"):
            logger.log_figure("fig", "figure", step=0)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="model must be an nn.Module, got dict"):
            logger.log_histograms({}, step=0)  # type: ignore[arg-type]
        net = nn.Linear(2, 2)
        with pytest.raises(ValueError, match=r"include 'wieght' matched no parameter of Linear; "
                                             r"did you mean weight"):
            logger.log_histograms(net, step=0, include="wieght")
        with torch.no_grad():
            net.bias[0] = math.nan
        with pytest.raises(ValueError, match="non-finite values in parameters/bias; nothing "
                                             "was written"):
            logger.log_histograms(net, step=0)
        assert logger.state_dict() == {"step": None}
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert not events.Tags()["images"] and not events.Tags()["histograms"]


def log_run(logger, records):
    for step, metrics in records:
        logger.log_metrics(metrics, step)


records_st = st.lists(
    st.dictionaries(st.sampled_from(["loss", "acc", "lr"]), st.floats(-1e3, 1e3, width=32),
                    min_size=1),
    min_size=1, max_size=8,
).map(lambda metrics: list(enumerate(metrics)))


@given(records=records_st, data=st.data())
def test_tensorboard_resume_drops_what_the_crashed_run_logged_after_the_checkpoint(
    records, data
):
    split = data.draw(st.integers(0, len(records)))
    crashed_tail = data.draw(st.integers(0, 3))
    with tempfile.TemporaryDirectory() as straight, tempfile.TemporaryDirectory() as resumed:
        with tk.TensorBoardLogger(straight) as logger:
            log_run(logger, records)
        crashed = tk.TensorBoardLogger(resumed)
        log_run(crashed, records[:split])
        state = roundtrip(crashed.state_dict())
        # the crashed run went on past the checkpoint with other values, then died
        log_run(crashed, [(split + i, {"loss": -1.0, "junk": 1.0}) for i in range(crashed_tail)])
        crashed.close()
        with tk.TensorBoardLogger(resumed) as logger:
            logger.load_state_dict(state)
            log_run(logger, records[split:])
            assert logger.state_dict() == {"step": len(records) - 1}
        expected = scalars(straight)
        got = scalars(resumed)
        assert {tag: got[tag] for tag in expected} == expected
        assert not got.get("junk")


def test_tensorboard_load_state_reopens_an_open_writer(tmp_path):
    logger = tk.TensorBoardLogger(tmp_path)
    logger.log_metrics({"loss": 1.0}, 0)
    logger.log_metrics({"loss": 9.0}, 1)
    logger.load_state_dict({"step": 0})
    logger.log_metrics({"loss": 2.0}, 1)
    logger.flush()
    logger.close()
    logger.close()
    assert scalars(tmp_path)["loss"] == [(0, 1.0), (1, 2.0)]


def test_tensorboard_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="flush_secs must be a number > 0, got 0; max_queue "
                                         "must be an int >= 1, got 0"):
        tk.TensorBoardLogger(tmp_path, flush_secs=0, max_queue=0)
    logger = tk.TensorBoardLogger(tmp_path)
    with pytest.raises(TypeError, match=r"step must be an int >= 0, got -1; metric 'x' must be "
                                        r"a number or a one-element tensor, got 'a'"):
        logger.log_metrics({"x": "a"}, -1)
    with pytest.raises(TypeError, match="hyperparameter names must be strings, got 1"):
        logger.log_hparams({1: 2}, {})
    with pytest.raises(TypeError, match="hparams must be a mapping of names to values, got list"):
        logger.log_hparams([("lr", 0.1)], {})
    with pytest.raises(TypeError, match="TensorBoardLogger.log_hparams: metric 'acc' must be"):
        logger.log_hparams({"lr": 0.1}, {"acc": "high"})
    with pytest.raises(KeyError, match=r"missing keys \['step'\]"):
        logger.load_state_dict({})
    with pytest.raises(TypeError, match="state 'step' must be an int or None, got 1.5"):
        logger.load_state_dict({"step": 1.5})
    logger.close()
    with pytest.raises(RuntimeError, match="is closed"):
        logger.log_metrics({"x": 1.0}, 0)
    with pytest.raises(RuntimeError, match=r"TensorBoardLogger \(.*\) is closed"):
        logger.load_state_dict({"step": 0})
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    hint = r"'tensorboard' is required for this feature; install it with: pip install "
    with pytest.raises(ImportError, match=hint + r'"torchkit\[tensorboard\]"'):
        tk.TensorBoardLogger(tmp_path)


def test_metric_validation_reports_every_problem(tmp_path):
    logger = tk.CSVLogger(tmp_path)
    with pytest.raises(TypeError, match="expects a mapping of metric names to numbers, got list"):
        logger.log_metrics([("a", 1.0)], 0)
    with pytest.raises(TypeError, match=r"step must be an int >= 0, got True; metric names must "
                                        r"be non-empty strings other than 'step', got 'step'; "
                                        r".*got ''; metric 'b' .* got tensor\(\[1., 2.\]\); "
                                        r"metric 'c' .* got False"):
        logger.log_metrics({"step": 1.0, "": 2.0, "b": torch.tensor([1.0, 2.0]), "c": False},
                           True)
    assert not logger.path.exists()


# --- CSVLogger ------------------------------------------------------------------------


def test_csv_rows_and_growing_header(tmp_path):
    with tk.CSVLogger(tmp_path / "logs") as logger:
        logger.log_metrics({"train_loss": 0.1 + 0.2}, step=0)
        logger.log_metrics({"train_loss": torch.tensor(0.5, dtype=torch.float64), "lr": 1e-3}, 1)
        logger.log_metrics({"val_acc": 0.75, "train_loss": float("nan")}, step=1)
        assert logger.state_dict() == {"rows": 3}
    assert logger.path == tmp_path / "logs" / "metrics.csv"
    with open(logger.path, newline="") as handle:
        assert next(csv.reader(handle)) == ["step", "train_loss", "lr", "val_acc"]
    table = rows(logger.path)
    assert table[0] == {"step": "0", "train_loss": "0.30000000000000004", "lr": "", "val_acc": ""}
    assert float(table[0]["train_loss"]) == 0.1 + 0.2  # full precision round trip
    assert table[1] == {"step": "1", "train_loss": "0.5", "lr": "0.001", "val_acc": ""}
    assert math.isnan(float(table[2]["train_loss"])) and table[2]["val_acc"] == "0.75"
    assert not [p for p in logger.path.parent.iterdir() if p.name != "metrics.csv"]
    assert repr(logger) == f"CSVLogger({str(logger.path)!r}, rows=3)"


def test_csv_if_exists(tmp_path):
    path = tmp_path / "m.csv"
    with tk.CSVLogger(path) as logger:
        logger.log_metrics({"a": 1.0}, 0)
    with pytest.raises(FileExistsError, match=r"m.csv already exists; pass if_exists="):
        tk.CSVLogger(path).log_metrics({"a": 2.0}, 1)
    with tk.CSVLogger(path, if_exists="append") as logger:
        logger.log_metrics({"b": 2.0}, 1)
        assert logger.state_dict() == {"rows": 2}
    assert rows(path) == [{"step": "0", "a": "1.0", "b": ""}, {"step": "1", "a": "", "b": "2.0"}]
    with tk.CSVLogger(path, if_exists="overwrite") as logger:
        logger.log_metrics({"c": 3.0}, 5)
    assert rows(path) == [{"step": "5", "c": "3.0"}]
    path.write_text("epoch,loss\n1,2\n")
    with pytest.raises(ValueError, match=r"not a CSVLogger file: its header must start with "
                                         r"'step', got \['epoch', 'loss'\]"):
        tk.CSVLogger(path, if_exists="append").log_metrics({"a": 1.0}, 0)
    path.write_text("")
    with tk.CSVLogger(path, if_exists="append") as logger:
        logger.log_metrics({"a": 1.0}, 0)
    assert rows(path) == [{"step": "0", "a": "1.0"}]


csv_records_st = st.lists(
    st.dictionaries(st.sampled_from(["loss", "acc", "lr", "val_loss"]),
                    st.floats(allow_nan=False), min_size=1),
    min_size=1, max_size=10,
).map(lambda metrics: [(step // 2, m) for step, m in enumerate(metrics)])  # repeated steps


@given(records=csv_records_st, data=st.data())
def test_csv_resume_gives_the_same_file_as_an_uninterrupted_run(records, data):
    split = data.draw(st.integers(0, len(records)))
    crashed_tail = data.draw(st.lists(st.sampled_from(["loss", "junk"]), max_size=3))
    with tempfile.TemporaryDirectory() as root:
        straight, resumed = Path(root) / "straight.csv", Path(root) / "resumed.csv"
        with tk.CSVLogger(straight) as logger:
            log_run(logger, records)
        crashed = tk.CSVLogger(resumed)
        log_run(crashed, records[:split])
        state = roundtrip(crashed.state_dict())
        log_run(crashed, [(99, {name: 0.0}) for name in crashed_tail])
        crashed.close()  # as a killed process's rows, flushed
        with tk.CSVLogger(resumed) as logger:  # if_exists="error" does not apply on resume
            logger.load_state_dict(state)
            log_run(logger, records[split:])
            assert logger.state_dict() == {"rows": len(records)}
        assert resumed.read_text() == straight.read_text()


def test_csv_resume_without_a_file_warns_and_starts_one(tmp_path, caplog):
    logger = tk.CSVLogger(tmp_path / "m.csv")
    with caplog.at_level(logging.WARNING, logger="torchkit.loggers"):
        logger.load_state_dict({"rows": 2})
    assert "has 0 rows but the checkpoint counted 2" in caplog.text
    logger.log_metrics({"a": 1.0}, 3)
    logger.close()
    assert rows(tmp_path / "m.csv") == [{"step": "3", "a": "1.0"}]
    fresh = tk.CSVLogger(tmp_path / "new.csv")
    fresh.load_state_dict({"rows": 0})
    fresh.close()
    assert (tmp_path / "new.csv").read_text() == "step\n"


def test_csv_errors(tmp_path):
    with pytest.raises(ValueError, match="if_exists must be 'error', 'overwrite' or 'append', "
                                         "got 'keep'"):
        tk.CSVLogger(tmp_path, if_exists="keep")
    logger = tk.CSVLogger(tmp_path)
    with pytest.raises(KeyError, match=r"missing keys \['rows'\] and unexpected keys \['step'\]"):
        logger.load_state_dict({"step": 1})
    with pytest.raises(TypeError, match="state 'rows' must be an int >= 0, got -1"):
        logger.load_state_dict({"rows": -1})
    logger.log_metrics({"a": 1.0}, 0)
    logger.flush()
    logger.close()
    with pytest.raises(RuntimeError, match="is closed"):
        logger.log_metrics({"a": 1.0}, 1)
