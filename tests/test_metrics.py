"""accuracy and ConfusionMatrix: python references, shapes, no host sync, state, plots."""

from __future__ import annotations

import io
import sys
from collections import Counter

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.overrides import TorchFunctionMode

import torchkit as tk

# Tensor methods that read a value back to the host (a device sync on an accelerator).
SYNCING = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu"}


class RecordCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def random_case(seed: int, n: int, c: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randint(0, c, (n,), generator=g)


def reference_accuracy(outputs, targets, top_k):
    hits = 0
    for scores, target in zip(outputs.tolist(), targets.tolist()):
        ranked = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
        hits += target in ranked[:top_k]
    return hits / len(targets)


@given(seed=st.integers(0, 2**16), n=st.integers(1, 40), c=st.integers(2, 7), data=st.data())
def test_accuracy_matches_python_reference(seed, n, c, data):
    top_k = data.draw(st.integers(1, c))
    outputs, targets = random_case(seed, n, c)
    result = tk.accuracy(outputs, targets, top_k=top_k)
    assert result.shape == () and result.dtype == torch.float32
    assert result.item() == pytest.approx(reference_accuracy(outputs, targets, top_k))


@given(seed=st.integers(0, 2**16), n=st.integers(1, 30), c=st.integers(2, 6))
def test_one_hot_and_soft_targets_equal_index_targets(seed, n, c):
    outputs, targets = random_case(seed, n, c)
    one_hot = nn.functional.one_hot(targets, c)
    soft = one_hot.float() * 0.8 + 0.2 / c
    expected = tk.accuracy(outputs, targets)
    assert torch.equal(tk.accuracy(outputs, one_hot), expected)
    assert torch.equal(tk.accuracy(outputs, soft), expected)


def test_top1_ties_pick_the_first_class_like_argmax():
    outputs = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    assert tk.accuracy(outputs, torch.tensor([0, 1])).item() == 1.0
    assert tk.accuracy(outputs, torch.tensor([1, 2])).item() == 0.0


def test_segmentation_shapes_count_every_position():
    outputs, targets = torch.randn(2, 4, 3, 5), torch.randint(0, 4, (2, 3, 5))
    flat_outputs = outputs.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = reference_accuracy(flat_outputs, targets.reshape(-1), 2)
    assert tk.accuracy(outputs, targets, top_k=2).item() == pytest.approx(expected)
    one_hot = nn.functional.one_hot(targets, 4).permute(0, 3, 1, 2)
    assert torch.equal(tk.accuracy(outputs, one_hot), tk.accuracy(outputs, targets))


def test_binary_logits_threshold_at_zero():
    logits = torch.tensor([2.0, -1.0, 0.5, -0.2])
    labels = torch.tensor([1, 0, 0, 1])
    assert tk.accuracy(logits, labels).item() == 0.5
    assert tk.accuracy(logits[:, None], labels[:, None]).item() == 0.5
    assert tk.accuracy(logits[:, None], labels.float()).item() == 0.5
    assert tk.accuracy(logits, labels.bool()).item() == 0.5
    assert tk.accuracy(torch.sigmoid(logits), labels, threshold=0.5).item() == 0.5
    assert tk.accuracy(logits, labels, threshold=1.0).item() == 0.75


def test_accuracy_stays_on_device_without_host_reads():
    outputs, targets = random_case(0, 16, 5)
    with RecordCalls() as calls:
        tk.accuracy(outputs, targets, top_k=3)
        tk.accuracy(outputs, nn.functional.one_hot(targets, 5))
        tk.accuracy(outputs[:, 0], targets.clamp(max=1))
    assert not calls.names & SYNCING
    meta = tk.accuracy(torch.empty(8, 3, device="meta"), torch.empty(8, dtype=torch.long,
                                                                     device="meta"))
    assert meta.device.type == "meta" and meta.shape == ()


def test_accuracy_of_a_trained_model_matches_its_confusion_matrix(tiny_model, tiny_batch):
    inputs, targets = tiny_batch
    optimizer = torch.optim.Adam(tiny_model.parameters(), lr=0.05)
    before = tk.accuracy(tiny_model(inputs), targets)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(tiny_model(inputs), targets).backward()
        optimizer.step()
    with torch.no_grad():
        outputs = tiny_model(inputs)
    after = tk.accuracy(outputs, targets)
    assert after > before and after >= 0.8
    matrix = tk.ConfusionMatrix(3)
    matrix.update(outputs, targets)
    counts = matrix.compute()
    assert counts.trace().item() / counts.sum().item() == pytest.approx(after.item())


def test_accuracy_errors():
    outputs, targets = random_case(0, 4, 3)
    with pytest.raises(TypeError, match="outputs must be a torch.Tensor, got list; targets"):
        tk.accuracy([1.0], [1])
    with pytest.raises(ValueError, match="top_k must be an int >= 1, got 0"):
        tk.accuracy(outputs, targets, top_k=0)
    with pytest.raises(ValueError, match="top_k must be an int >= 1, got True"):
        tk.accuracy(outputs, targets, top_k=True)
    with pytest.raises(ValueError, match=r"top_k must be at most the number of classes \(3\)"):
        tk.accuracy(outputs, targets, top_k=4)
    with pytest.raises(TypeError, match="threshold must be a number, got '0'"):
        tk.accuracy(outputs, targets, threshold="0")
    with pytest.raises(ValueError, match=r"empty batch is undefined: outputs has shape \(0, 3\)"):
        tk.accuracy(torch.empty(0, 3), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"class indices of shape \(4,\) or one-hot/soft "
                                         r"labels of shape \(4, 3\).*got \(5,\)"):
        tk.accuracy(outputs, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match=r"integer tensor, got torch.float32; .*targets.long\(\)"):
        tk.accuracy(outputs, targets.float())
    with pytest.raises(ValueError, match=r"top_k must be 1 for binary outputs of shape \(4,\)"):
        tk.accuracy(outputs[:, 0], targets, top_k=2)
    with pytest.raises(ValueError, match=r"binary targets must have shape \(4,\).*got \(4, 3\)"):
        tk.accuracy(outputs[:, :1], outputs)


def reference_matrix(pairs, c):
    counts = Counter(pairs)
    return [[counts[(i, j)] for j in range(c)] for i in range(c)]


batches_st = st.lists(
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=20),
    min_size=1, max_size=4,
)


@given(batches=batches_st)
def test_confusion_matrix_matches_python_reference(batches):
    matrix = tk.ConfusionMatrix(5)
    for batch in batches:
        targets, preds = (torch.tensor(column) for column in zip(*batch))
        matrix.update(preds, targets)
    pairs = [pair for batch in batches for pair in batch]
    counts = matrix.compute()
    assert counts.dtype == torch.long
    assert counts.tolist() == reference_matrix(pairs, 5)
    assert counts.sum().item() == len(pairs)


@given(batches=batches_st, normalize=st.sampled_from(["true", "pred", "all"]))
def test_normalized_matrix_matches_reference(batches, normalize):
    matrix = tk.ConfusionMatrix(5, normalize=normalize)
    for batch in batches:
        targets, preds = (torch.tensor(column) for column in zip(*batch))
        matrix.update(preds, targets)
    counts = torch.tensor(reference_matrix([p for b in batches for p in b], 5), dtype=torch.float)
    if normalize == "true":
        expected = [[v / s if s else 0.0 for v in row] for row, s in zip(counts.tolist(),
                                                                        counts.sum(1).tolist())]
    elif normalize == "pred":
        expected = (counts / counts.sum(0).clamp(min=1)).tolist()
    else:
        expected = (counts / counts.sum()).tolist()
    torch.testing.assert_close(matrix.compute(), torch.tensor(expected))


def test_logits_and_one_hot_inputs_and_segmentation_shapes():
    matrix = tk.ConfusionMatrix(3)
    logits = torch.tensor([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0]])
    matrix.update(logits, torch.tensor([1, 2]))
    matrix.update(logits, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert matrix.compute().tolist() == [[1, 0, 0], [0, 2, 0], [1, 0, 0]]
    segmentation = tk.ConfusionMatrix(3)
    outputs, targets = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    segmentation.update(outputs, targets)
    pairs = zip(targets.reshape(-1).tolist(), outputs.argmax(1).reshape(-1).tolist())
    assert segmentation.compute().tolist() == reference_matrix(list(pairs), 3)


def test_per_class_accuracy_is_recall_and_nan_for_absent_classes():
    matrix = tk.ConfusionMatrix(3)
    matrix.update(torch.tensor([0, 0, 1, 2, 1]), torch.tensor([0, 1, 1, 1, 0]))
    recall = matrix.per_class_accuracy()
    torch.testing.assert_close(recall[:2], torch.tensor([0.5, 1 / 3]))
    assert recall[2].isnan()


def test_update_stays_on_device_without_host_reads():
    matrix = tk.ConfusionMatrix(4)
    outputs, targets = random_case(0, 32, 4)
    with RecordCalls() as calls:
        matrix.update(outputs, targets)
        matrix.update(outputs.argmax(1), targets)
        matrix.update(torch.tensor([7, -1]), torch.tensor([0, 9]))  # out of range
    assert not calls.names & SYNCING


def test_out_of_range_indices_are_never_silently_dropped():
    matrix = tk.ConfusionMatrix(3)
    matrix.update(torch.tensor([0, 3, 1]), torch.tensor([0, 1, -100]))
    assert matrix.counts().tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match=r"2 sample\(s\) had a target or predicted index "
                                         r"outside \[0, 3\).*then reset\(\)"):
        matrix.compute()
    with pytest.raises(ValueError, match="outside"):
        matrix.per_class_accuracy()
    matrix.reset()
    assert matrix.compute().sum().item() == 0


def test_reset_zeroes_counts():
    matrix = tk.ConfusionMatrix(2)
    matrix.update(torch.tensor([1, 0]), torch.tensor([1, 1]))
    matrix.reset()
    matrix.update(torch.tensor([1]), torch.tensor([0]))
    assert matrix.compute().tolist() == [[0, 1], [0, 0]]


def test_device_option_keeps_counts_there():
    matrix = tk.ConfusionMatrix(2, device="meta")
    matrix.update(torch.tensor([1, 0]), torch.tensor([1, 1]))
    assert matrix.counts().device.type == "meta"
    follow = tk.ConfusionMatrix(2)
    follow.update(torch.tensor([1]), torch.tensor([1]))
    assert follow.counts().device.type == "cpu"
    assert repr(follow) == "ConfusionMatrix(num_classes=2, normalize=None, device=cpu)"


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@given(batches=batches_st, split=st.integers(0, 4))
def test_state_round_trip_continues_the_same_counts(batches, split):
    a, b = tk.ConfusionMatrix(5), tk.ConfusionMatrix(5)
    tensors = [tuple(torch.tensor(c) for c in zip(*batch)) for batch in batches]
    for targets, preds in tensors[:split]:
        a.update(preds, targets)
    a.update(torch.tensor([5]), torch.tensor([0]))  # an invalid pair survives the trip too
    b.load_state_dict(roundtrip(a.state_dict()))
    for targets, preds in tensors[split:]:
        a.update(preds, targets)
        b.update(preds, targets)
    assert torch.equal(a.counts(), b.counts())
    assert set(a.state_dict()) == {"counts", "num_invalid"}
    assert b.state_dict()["num_invalid"].item() == 1
    with pytest.raises(ValueError, match="1 sample"):
        b.compute()


def test_confusion_matrix_errors():
    with pytest.raises(TypeError, match="num_classes must be an int, got 2.0"):
        tk.ConfusionMatrix(2.0)
    with pytest.raises(ValueError, match="num_classes must be >= 2, got 1; normalize must be "
                                         "None, 'true', 'pred' or 'all', got 'rows'"):
        tk.ConfusionMatrix(1, normalize="rows")
    matrix = tk.ConfusionMatrix(3)
    with pytest.raises(TypeError, match="targets must be a torch.Tensor, got list"):
        matrix.update(torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError, match=r"shape \(N, 3, \.\.\.\).*got \(2, 4\); pass integer"):
        matrix.update(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"score outputs must have shape \(N, 3, \.\.\.\)"):
        matrix.update(torch.zeros(2), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer targets of the same shape, got outputs "
                                        "torch.int64 and targets torch.float32"):
        matrix.update(torch.tensor([0, 1]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"same shape, got \(2,\) and \(3,\)"):
        matrix.update(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    with pytest.raises(KeyError, match=r"missing keys \['num_invalid'\]"):
        matrix.load_state_dict({"counts": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"counts of shape \(3, 3\) for num_classes=3, "
                                         r"got \(2, 2\)"):
        matrix.load_state_dict({"counts": torch.zeros(2, 2), "num_invalid": 0})
    with pytest.raises(ValueError, match="got <class 'list'>"):
        matrix.load_state_dict({"counts": [[0]], "num_invalid": 0})


def test_plot_writes_a_png_and_draws_into_given_axes(tmp_path):
    from matplotlib.figure import Figure

    matrix = tk.ConfusionMatrix(3, normalize="true")
    matrix.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]))
    fig = matrix.plot(tmp_path / "cm.png", class_names=["a", "b", "c"])
    assert isinstance(fig, Figure)
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["1.00", "0.00", "0.00", "0.00", "0.50", "0.50", "0.00", "0.00", "1.00"]
    outer = Figure()
    ax = outer.subfigures(1, 2)[1].add_subplot()
    assert tk.ConfusionMatrix(2).plot(ax=ax) is outer
    assert [t.get_text() for t in ax.texts] == ["0", "0", "0", "0"]


def test_plot_errors(monkeypatch):
    matrix = tk.ConfusionMatrix(3)
    with pytest.raises(ValueError, match="class_names must have num_classes=3 entries, got 2"):
        matrix.plot(class_names=["a", "b"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r'pip install "torchkit\[plot\]"'):
        matrix.plot()


def test_metric_protocol():
    assert isinstance(tk.ConfusionMatrix(2), tk.Metric)
    assert not isinstance(tk.accuracy, tk.Metric)


# --- precision, recall, F1 ------------------------------------------------------------


def sklearn_scores(pairs, c):
    """scikit-learn's scores: per class (nan where undefined) and averaged over the classes
    that occur, an undefined score counting 0 (torchmetrics' convention too)."""
    import numpy as np
    from sklearn import metrics

    y_true, y_pred = (np.array(column) for column in zip(*pairs))
    present = np.unique(np.concatenate([y_true, y_pred]))
    scores = {}
    for kind, fn in (("precision", metrics.precision_score), ("recall", metrics.recall_score),
                     ("f1", metrics.f1_score)):
        scores[kind, None] = fn(y_true, y_pred, labels=list(range(c)), average=None,
                                zero_division=np.nan)
        scores[kind, "macro"] = fn(y_true, y_pred, labels=present, average="macro",
                                   zero_division=0)
        scores[kind, "micro"] = fn(y_true, y_pred, average="micro", zero_division=0)
    return scores


@given(batches=batches_st)
def test_precision_recall_f1_match_sklearn(batches):
    matrix = tk.ConfusionMatrix(5)
    for batch in batches:
        targets, preds = (torch.tensor(column) for column in zip(*batch))
        matrix.update(preds, targets)
    pairs = [pair for batch in batches for pair in batch]
    expected = sklearn_scores(pairs, 5)
    for (kind, average), value in expected.items():
        got = getattr(matrix, kind)(average)
        assert got.dtype == torch.float32 and got.shape == ((5,) if average is None else ())
        torch.testing.assert_close(got, torch.tensor(value, dtype=torch.float32),
                                   equal_nan=True, msg=f"{kind}({average!r})")
    accuracy = sum(t == p for t, p in pairs) / len(pairs)
    for kind in ("precision", "recall", "f1"):  # micro averages of single-label data
        assert getattr(matrix, kind)("micro").item() == pytest.approx(accuracy)
    assert matrix.f1().item() == pytest.approx(float(expected["f1", "macro"]))  # the default


def test_precision_recall_f1_edge_cases():
    matrix = tk.ConfusionMatrix(3)
    assert matrix.f1().isnan() and matrix.precision("micro").isnan()  # no samples yet
    matrix.update(torch.tensor([0, 0]), torch.tensor([0, 0]))
    assert matrix.f1().item() == 1.0  # classes 1 and 2 never occur: not averaged in
    assert matrix.recall(None)[1:].isnan().all()
    with pytest.raises(ValueError, match="average must be 'macro', 'micro' or None, got 'mean'"):
        matrix.f1("mean")  # type: ignore[arg-type]
    matrix.update(torch.tensor([7]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"1 sample\(s\) had a target or predicted index"):
        matrix.precision()


def test_plot_png_opens(tmp_path):
    from PIL import Image

    matrix = tk.ConfusionMatrix(2)
    matrix.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    matrix.plot(tmp_path / "cm.png")
    assert (tmp_path / "cm.png").stat().st_size > 0
    with Image.open(tmp_path / "cm.png") as image:
        image.verify()
