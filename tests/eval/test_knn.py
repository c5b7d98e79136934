"""k-NN classification checked against a plain torch implementation of DINO's weighted vote."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mokd_eval import knn as knn_module
from mokd.core.errors import MokdError
from mokd_eval.knn import DEFAULT_KS, DEFAULT_TEMPERATURE, knn_classify

NUM_CLASSES = 10
DIM = 32


def reference_knn(train_x, train_y, test_x, test_y, k, temperature, num_classes, dtype=torch.float32):
    """DINO's formula, written out: full similarity matrix, topk, exp(sim/T) votes, stable sort of the scores."""
    train = F.normalize(torch.as_tensor(train_x).to(dtype), dim=1)
    test = F.normalize(torch.as_tensor(test_x).to(dtype), dim=1)
    train_y, test_y = torch.as_tensor(train_y), torch.as_tensor(test_y)
    top_sims, top_idx = (test @ train.T).topk(k, dim=1)
    scores = torch.zeros(len(test), num_classes, dtype=dtype).scatter_add_(1, train_y[top_idx], (top_sims / temperature).exp())
    order = scores.sort(dim=1, descending=True, stable=True).indices
    top1 = (order[:, 0] == test_y).double().mean().item() * 100
    top5 = (order[:, :min(5, num_classes)] == test_y[:, None]).any(dim=1).double().mean().item() * 100
    return order[:, 0].numpy(), top1, top5


def clustered(n_train, n_test, *, spread=2.0, num_classes=NUM_CLASSES, seed=0, test_classes=None):
    """Gaussian clusters around shared random centres; `spread` 2.0 overlaps enough that accuracy < 100%."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, DIM, generator=generator)

    def draw(n, classes):
        labels = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=generator)]
        return centres[labels] + spread * torch.randn(n, DIM, generator=generator), labels

    all_classes = list(range(num_classes))
    return (*draw(n_train, all_classes), *draw(n_test, test_classes or all_classes))


def assert_matches_reference(result, train_x, train_y, test_x, test_y, num_classes, temperature=DEFAULT_TEMPERATURE):
    for k in result.ks:
        predictions, top1, top5 = reference_knn(train_x, train_y, test_x, test_y, k, temperature, num_classes)
        np.testing.assert_array_equal(result.predictions[k], predictions)
        assert result.predictions[k].dtype == np.int64
        assert result.metrics[k]["top1"] == pytest.approx(top1, abs=1e-9)
        assert result.metrics[k]["top5"] == pytest.approx(top5, abs=1e-9)


def test_matches_reference_on_overlapping_clusters():
    torch.manual_seed(0)
    train_x, train_y, test_x, test_y = clustered(800, 300)
    result = knn_classify(train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES, device="cpu")
    assert result.ks == DEFAULT_KS
    assert_matches_reference(result, train_x, train_y, test_x, test_y, NUM_CLASSES)
    top1 = [result.metrics[k]["top1"] for k in result.ks]
    assert all(20 < value < 100 for value in top1), top1
    assert min(result.metrics[k]["top5"] for k in result.ks) < 100
    assert result.best_k == max(result.ks, key=lambda k: (result.metrics[k]["top1"], -k))
    assert set(result.timings) == {"index", "search", "vote"} and result.warnings == []


def test_fewer_than_100_queries_in_uneven_chunks():
    train_x, train_y, test_x, test_y = clustered(400, 37, seed=1)
    result = knn_classify(train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy(),
                          num_classes=NUM_CLASSES, query_chunk_size=8, temperature=0.1)
    assert_matches_reference(result, train_x, train_y, test_x, test_y, NUM_CLASSES, temperature=0.1)


def test_small_k_and_nearest_neighbour_label():
    train_x, train_y, test_x, test_y = clustered(300, 120, seed=2)
    result = knn_classify(train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES, ks=(3, 1))
    assert result.ks == (1, 3)
    assert_matches_reference(result, train_x, train_y, test_x, test_y, NUM_CLASSES)
    cosine = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T
    np.testing.assert_array_equal(result.predictions[1], train_y[cosine.argmax(dim=1)].numpy())


def test_class_absent_from_test_set_keeps_training_class_count():
    train_x, train_y, test_x, test_y = clustered(500, 150, seed=3, test_classes=list(range(NUM_CLASSES - 1)))
    assert (test_y == NUM_CLASSES - 1).sum() == 0
    result = knn_classify(train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES, ks=(10, 20))
    assert_matches_reference(result, train_x, train_y, test_x, test_y, NUM_CLASSES)
    assert any((result.predictions[k] == NUM_CLASSES - 1).any() for k in result.ks)


def test_k_larger_than_bank_is_clamped_with_warning():
    train_x, train_y, test_x, test_y = clustered(60, 40, seed=4)
    result = knn_classify(train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES)
    assert result.ks == (10, 20, 60)
    assert set(result.metrics) == set(result.predictions) == {10, 20, 60}
    assert len(result.warnings) == 2 and all("using k=60" in warning for warning in result.warnings)
    assert_matches_reference(result, train_x, train_y, test_x, test_y, NUM_CLASSES)


def test_k_larger_than_bank_in_error_mode():
    train_x, train_y, test_x, test_y = clustered(60, 40, seed=4)
    with pytest.raises(MokdError, match="k=100 exceeds the 60 training samples"):
        knn_classify(train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES, on_large_k="error")


@pytest.mark.parametrize("num_classes", [2, 3])
def test_fewer_than_five_classes_top5_is_top_c(num_classes):
    train_x, train_y, test_x, test_y = clustered(200, 90, num_classes=num_classes, spread=3.0, seed=5)
    result = knn_classify(train_x, train_y, test_x, test_y, num_classes=num_classes, ks=(1, 4, 10))
    assert_matches_reference(result, train_x, train_y, test_x, test_y, num_classes)
    assert all(result.metrics[k]["top5"] == 100.0 for k in result.ks)
    assert all(result.metrics[k]["top1"] < 100.0 for k in result.ks)


def test_fp16_bank_matches_fp32_on_separated_clusters():
    train_x, train_y, test_x, test_y = clustered(600, 200, spread=0.8, seed=6)
    exact = knn_classify(train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES)
    half = knn_classify(train_x.half(), train_y, test_x.half(), test_y, num_classes=NUM_CLASSES, fp16_bank=True)
    for k in exact.ks:
        np.testing.assert_array_equal(half.predictions[k], exact.predictions[k])
        assert half.metrics[k] == pytest.approx(exact.metrics[k])


def test_bfloat16_tensors_are_converted_per_chunk():
    train_x, train_y, test_x, test_y = clustered(300, 60, seed=9)
    train_bf16, test_bf16 = train_x.bfloat16(), test_x.bfloat16()
    result = knn_classify(train_bf16, train_y, test_bf16, test_y, num_classes=NUM_CLASSES, ks=(10, 20))
    assert_matches_reference(result, train_bf16.float(), train_y, test_bf16.float(), test_y, NUM_CLASSES)


def test_tiny_temperature_does_not_overflow():
    # exp(1 / 0.004) = 1e108 overflows float32; the float64 reference does not overflow.
    train_x, train_y, test_x, test_y = clustered(400, 150, spread=1.5, seed=10)
    result = knn_classify(train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES, ks=(10, 200), temperature=0.004)
    for k in result.ks:
        predictions, top1, top5 = reference_knn(train_x, train_y, test_x, test_y, k, 0.004, NUM_CLASSES,
                                                dtype=torch.float64)
        np.testing.assert_array_equal(result.predictions[k], predictions)
        assert result.metrics[k] == pytest.approx({"top1": top1, "top5": top5})
        assert 20 < top1 < 100


def test_hand_computed_votes():
    # Unnormalised on purpose: cosine ignores the scale. With T = 1, query (1, 0) sees
    # sims 1 (class 0), 0.8 (class 1), 0 (class 1): k=2 -> e^1 > e^0.8, class 0;
    # k=3 -> class 1 gets e^0.8 + e^0 = 3.23 > e = 2.72, class 1.
    # Query (0, 1) sees sims 0, 0.6, 1: class 1 for every k.
    train_x = np.array([[3.0, 0.0], [0.8, 0.6], [0.0, 5.0]], dtype=np.float32)
    train_y = np.array([0, 1, 1])
    test_x = np.array([[2.0, 0.0], [0.0, 0.5]], dtype=np.float32)
    test_y = np.array([0, 1])
    result = knn_classify(train_x, train_y, test_x, test_y, num_classes=2, ks=(1, 2, 3), temperature=1.0)
    assert math.exp(0.8) + 1 > math.e
    assert {k: result.predictions[k].tolist() for k in result.ks} == {1: [0, 1], 2: [0, 1], 3: [1, 1]}
    assert {k: result.metrics[k]["top1"] for k in result.ks} == {1: 100.0, 2: 100.0, 3: 50.0}
    assert result.best_k == 1


def test_equal_scores_go_to_the_smaller_class():
    # The query is exactly equidistant from a class-1 and a class-0 point, so both get equal
    # scores and the eight classes with no vote tie at zero: the order is 0, 1, 2, 3, 4, ...
    train_x = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    train_y = np.array([1, 0])
    test_x = np.ones((10, 2), dtype=np.float32)
    test_y = np.arange(10)
    result = knn_classify(train_x, train_y, test_x, test_y, num_classes=10, ks=(2,))
    assert result.predictions[2].tolist() == [0] * 10
    assert result.metrics[2] == {"top1": 10.0, "top5": 50.0}
    assert_matches_reference(result, train_x, train_y, test_x, test_y, 10)


def test_inputs_are_not_modified_and_faiss_threads_restored():
    train_x, train_y, test_x, test_y = clustered(100, 30, seed=7)
    train_np, test_np = train_x.numpy().copy(), test_x.numpy().copy()
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        knn_classify(train_np, train_y, test_np, test_y, num_classes=NUM_CLASSES, ks=(5,))
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(previous)
    np.testing.assert_array_equal(train_np, train_x.numpy())
    np.testing.assert_array_equal(test_np, test_x.numpy())


def _with_nan(features, value):
    features = features.clone()
    features[3, 5] = value
    return features


@pytest.mark.parametrize("change, message", [
    (lambda d: {**d, "train_features": d["train_features"][:0], "train_labels": d["train_labels"][:0]}, "empty"),
    (lambda d: {**d, "test_features": d["test_features"][:, :-1]}, "dimension"),
    (lambda d: {**d, "train_features": _with_nan(d["train_features"], float("nan"))}, "row 3 contains NaN"),
    (lambda d: {**d, "test_features": _with_nan(d["test_features"], float("inf"))}, "row 3 contains NaN or inf"),
    (lambda d: {**d, "train_labels": d["train_labels"][:-1]}, "entries but the features have"),
    (lambda d: {**d, "test_labels": d["test_labels"] + NUM_CLASSES}, "outside the 10 training classes"),
    (lambda d: {**d, "train_labels": d["train_labels"].float()}, "integer"),
    (lambda d: {**d, "temperature": 0.0}, "temperature"),
    (lambda d: {**d, "temperature": -0.07}, "temperature"),
    (lambda d: {**d, "ks": (10, 0)}, "positive integer"),
    (lambda d: {**d, "ks": ()}, "empty"),
    (lambda d: {**d, "on_large_k": "skip"}, "on_large_k"),
    (lambda d: {**d, "device": "tpu"}, "device"),
    (lambda d: {**d, "query_chunk_size": 0}, "query_chunk_size"),
])
def test_invalid_inputs_raise_one_line_mokd_error(change, message):
    train_x, train_y, test_x, test_y = clustered(50, 20, seed=8)
    arguments = dict(train_features=train_x, train_labels=train_y, test_features=test_x, test_labels=test_y,
                     num_classes=NUM_CLASSES, ks=(5,))
    with pytest.raises(MokdError, match=message) as error:
        knn_classify(**change(arguments))
    assert "\n" not in str(error.value)


def _knn_inputs() -> dict:
    train_x, train_y, test_x, test_y = clustered(50, 20, seed=8)
    return dict(train_features=train_x, train_labels=train_y, test_features=test_x, test_labels=test_y,
                num_classes=NUM_CLASSES, ks=(5,))


class _CpuOnlyFaiss:
    """What faiss-cpu offers for the GPU question: no GPU classes (and get_num_gpus answers 0)."""

    @staticmethod
    def get_num_gpus() -> int:
        return 0


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_search_with_cpu_only_faiss_names_the_switch_command(monkeypatch, device):
    monkeypatch.setattr(knn_module, "faiss", _CpuOnlyFaiss())
    with pytest.raises(MokdError, match="CPU-only: make install FAISS=gpu") as error:
        knn_classify(**_knn_inputs(), device=device)
    assert "\n" not in str(error.value)


def test_missing_faiss_names_the_install_command(monkeypatch):
    monkeypatch.setattr(knn_module, "faiss", None)
    with pytest.raises(MokdError, match=r"not installed: pip install -e '\.\[cpu\]' \(CPU\) or pip install -e "
                                         r"'\.\[gpu\]'") as error:
        knn_classify(**_knn_inputs(), device="cpu")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("faiss_module, device, message", [
    (None, "cpu", "k-NN needs faiss, which is not installed"),
    (_CpuOnlyFaiss(), "cuda", "installed faiss is CPU-only"),
])
def test_knn_command_checks_faiss_before_any_work(monkeypatch, tmp_path, faiss_module, device, message):
    """The faiss error comes before the checkpoint is even opened (this one does not exist)."""
    from mokd_eval.knn_eval import run_knn
    from mokd.core.features import FeatureCache
    from mokd.core.pipeline import FeatureOptions, RunSettings

    monkeypatch.setattr(knn_module, "faiss", faiss_module)
    options = FeatureOptions(cache=FeatureCache(None), batch_size=8, num_workers=0, device=device)
    with pytest.raises(MokdError, match=message):
        run_knn(tmp_path / "missing.pth", RunSettings(data="digits"), ks=(5,), temperature=0.07, features=options)
