"""Weighted k-NN classification of frozen features (DINO's protocol), searched with FAISS.

Protocol: features are L2-normalised, similarity is cosine, each of the k nearest training
samples votes for its label with weight exp(sim / T), and the class scores are summed;
T = 0.07 and k in {10, 20, 100, 200} by default.

Why not DINO's loop: it searches the whole bank once per k, builds a chunk x k x C one-hot
tensor for the vote, and crashes under 100 test images. Here ONE exact search at max(k) serves
every k (FAISS returns neighbours sorted by similarity), the vote is a scatter-add into a
chunk x C matrix, and the bank is normalised and added chunk by chunk, so peak memory is the
index plus one chunk (an ImageNet ResNet-50 bank is 10.5 GB in float32, 5.2 GB in float16).

Tie-breaking: classes are ranked exactly as `torch.sort(scores, descending=True, stable=True)`
would rank them, i.e. equal scores go to the smaller class index. Top-1 is `argmax` (first
maximum); top-5 counts a hit when the true class is within the first min(5, C) of that order.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mokd.core.errors import MokdError

try:  # faiss comes from one of two wheels (extras `cpu`, `gpu`); without either, k-NN says how to install one
    import faiss
except ImportError:
    faiss = None

# What to run from the repository: both wheels write the module `faiss`, so switching replaces one by the other.
INSTALL_FAISS = "pip install -e '.[cpu]' (CPU) or pip install -e '.[gpu]' (GPU, CUDA 12; see docs/gpu.md)"
SWITCH_TO_GPU_FAISS = "make install FAISS=gpu (replaces faiss-cpu by faiss-gpu; see docs/gpu.md)"

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07
TOP5 = 5
ON_LARGE_K_CHOICES = ("clamp", "error")
# Bank rows are normalised and added in float32 slices of about this size: the only staging copy.
BANK_CHUNK_BYTES = 8 * 2**20
FLOAT32_EXP_LIMIT = math.log(torch.finfo(torch.float32).max)
# FAISS GPU k-selection cannot return more neighbours than this.
GPU_MAX_K = 2048
# Below this many query chunks a progress bar is noise.
PROGRESS_MIN_CHUNKS = 4


@dataclass
class KnnResult:
    """Accuracies (percent) per k, the top-1 predictions behind them, and where the time went."""

    metrics: dict[int, dict[str, float]]
    predictions: dict[int, np.ndarray]
    best_k: int
    ks: tuple[int, ...]
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)


def knn_classify(train_features, train_labels, test_features, test_labels, *, num_classes: int,
                 ks: Sequence[int] = DEFAULT_KS, temperature: float = DEFAULT_TEMPERATURE,
                 query_chunk_size: int = 4096, fp16_bank: bool = False, device: str = "auto",
                 on_large_k: str = "clamp") -> KnnResult:
    """Classify every test feature by a weighted vote of its nearest training features.

    `num_classes` must come from the training set / dataset definition, never from the test labels
    (a class may be missing from the test split). `fp16_bank=True` stores the bank in float16
    (GPU: FAISS float16 storage; CPU: a QT_fp16 scalar quantizer, which halves memory but searches
    without BLAS and is slower); similarities then differ from float32 in the last bits, so a
    near-tie may flip. `on_large_k="clamp"` turns a k larger than the bank into k = bank size
    with a warning; `"error"` raises `MokdError`.
    """
    _require_faiss()
    _check_options(num_classes, temperature, query_chunk_size, on_large_k)
    train_x = _checked_features(train_features, "train_features")
    test_x = _checked_features(test_features, "test_features")
    if train_x.shape[1] != test_x.shape[1]:
        raise MokdError(f"k-NN: train features have dimension {train_x.shape[1]} but test features "
                        f"{test_x.shape[1]}; extract both with the same backbone")
    train_y = _labels_as_numpy(train_labels, "train_labels", len(train_x), num_classes)
    test_y = _labels_as_numpy(test_labels, "test_labels", len(test_x), num_classes)
    warnings: list[str] = []
    used_ks = _resolve_ks(ks, len(train_x), on_large_k, warnings)
    gpu_device = _gpu_device(device)
    if gpu_device is not None and used_ks[-1] > GPU_MAX_K:
        raise MokdError(f"k-NN: k={used_ks[-1]} exceeds the FAISS GPU limit of {GPU_MAX_K}; "
                        "use smaller ks or --device cpu")

    timings = {"index": 0.0, "search": 0.0, "vote": 0.0}
    with _faiss_threads(torch.get_num_threads()):
        start_time = time.perf_counter()
        index = _build_index(train_x, fp16_bank, gpu_device)
        timings["index"] = time.perf_counter() - start_time
        tally = _VoteTally(used_ks, len(test_x), num_classes, temperature, torch.from_numpy(train_y))
        chunk_starts = range(0, len(test_x), query_chunk_size)
        progress = tqdm(chunk_starts, desc="k-NN search", unit="chunk",
                        disable=True if len(chunk_starts) < PROGRESS_MIN_CHUNKS else None)
        for start in progress:
            stop = min(start + query_chunk_size, len(test_x))
            start_time = time.perf_counter()
            queries = _normalised_rows(test_x, start, stop, "test_features")
            similarities, neighbours = index.search(queries, used_ks[-1])
            timings["search"] += time.perf_counter() - start_time
            start_time = time.perf_counter()
            tally.add(start, similarities, neighbours, test_y[start:stop])
            timings["vote"] += time.perf_counter() - start_time

    metrics = tally.metrics()
    best_k = max(used_ks, key=lambda k: (metrics[k]["top1"], -k))
    return KnnResult(metrics=metrics, predictions=tally.predictions, best_k=best_k, ks=used_ks,
                     timings=timings, warnings=warnings)


class _VoteTally:
    """Votes one chunk of search results for every k and accumulates the hits."""

    def __init__(self, ks: tuple[int, ...], n_test: int, num_classes: int, temperature: float,
                 train_labels: torch.Tensor) -> None:
        self.ks = ks
        self.n_test = n_test
        self.num_classes = num_classes
        self.temperature = temperature
        self.train_labels = train_labels
        # A sum of k weights up to exp(1 / T) overflows float32 when T is tiny (T < 0.012 for k = 200).
        # Then each row is scaled by exp(-top sim / T): same class ranking, finite sums. Otherwise the
        # weights are exactly exp(sim / T), bit for bit what a plain implementation computes.
        self.shift_exponents = 1.0 / temperature + math.log(max(ks)) >= FLOAT32_EXP_LIMIT
        self.predictions = {k: np.empty(n_test, dtype=np.int64) for k in ks}
        self.top1_hits = dict.fromkeys(ks, 0)
        self.top5_hits = dict.fromkeys(ks, 0)

    def add(self, start: int, similarities: np.ndarray, neighbours: np.ndarray, labels: np.ndarray) -> None:
        neighbour_labels = self.train_labels[torch.from_numpy(neighbours)]
        exponents = torch.from_numpy(similarities).div(self.temperature)
        if self.shift_exponents:
            exponents -= exponents[:, :1].clone()
        weights = exponents.exp_()
        truth = torch.from_numpy(labels)
        for k in self.ks:
            scores = torch.zeros(len(labels), self.num_classes, dtype=weights.dtype)
            scores.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            predicted = scores.argmax(dim=1)
            self.predictions[k][start:start + len(labels)] = predicted.numpy()
            self.top1_hits[k] += int((predicted == truth).sum())
            self.top5_hits[k] += int((_rank_of_truth(scores, truth) < min(TOP5, self.num_classes)).sum())

    def metrics(self) -> dict[int, dict[str, float]]:
        return {k: {"top1": 100.0 * self.top1_hits[k] / self.n_test,
                    "top5": 100.0 * self.top5_hits[k] / self.n_test} for k in self.ks}


def _rank_of_truth(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Position of the true class in a stable descending sort of each row, without sorting."""
    true_score = scores.gather(1, truth[:, None])
    class_index = torch.arange(scores.shape[1])
    ahead = (scores > true_score) | ((scores == true_score) & (class_index[None, :] < truth[:, None]))
    return ahead.sum(dim=1)


def _check_options(num_classes: int, temperature: float, query_chunk_size: int, on_large_k: str) -> None:
    if int(num_classes) != num_classes or num_classes < 1:
        raise MokdError(f"k-NN: num_classes must be a positive integer, got {num_classes!r}")
    if not np.isfinite(temperature) or temperature <= 0:
        raise MokdError(f"k-NN: temperature must be a positive number, got {temperature!r} (DINO uses 0.07)")
    if int(query_chunk_size) != query_chunk_size or query_chunk_size < 1:
        raise MokdError(f"k-NN: query_chunk_size must be a positive integer, got {query_chunk_size!r}")
    if on_large_k not in ON_LARGE_K_CHOICES:
        raise MokdError(f"k-NN: on_large_k must be one of {ON_LARGE_K_CHOICES}, got {on_large_k!r}")


def _checked_features(features, name: str) -> np.ndarray | torch.Tensor:
    """The features as given (numpy, memmap or CPU tensor, no copy); rows are converted later, per chunk."""
    if isinstance(features, torch.Tensor):
        array = features.detach().cpu()
        is_float = array.is_floating_point()
    else:
        array = np.asarray(features)
        is_float = np.issubdtype(array.dtype, np.floating)
    if array.ndim != 2:
        raise MokdError(f"k-NN: {name} must be a 2-D array (samples x dimension), got shape {tuple(array.shape)}")
    if not is_float:
        raise MokdError(f"k-NN: {name} must be floating point, got dtype {array.dtype}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise MokdError(f"k-NN: {name} is empty (shape {tuple(array.shape)}); extract features first")
    return array


def _labels_as_numpy(labels, name: str, n_rows: int, num_classes: int) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise MokdError(f"k-NN: {name} must be a 1-D integer array, got shape {array.shape} dtype {array.dtype}")
    if len(array) != n_rows:
        raise MokdError(f"k-NN: {name} has {len(array)} entries but the features have {n_rows} rows; "
                        "re-extract features and labels together")
    if array.min() < 0 or array.max() >= num_classes:
        raise MokdError(f"k-NN: {name} range [{array.min()}, {array.max()}] is outside the {num_classes} "
                        "training classes; check that train and test use the same class list")
    return array.astype(np.int64, copy=False)


def _resolve_ks(ks: Sequence[int], n_train: int, on_large_k: str, warnings: list[str]) -> tuple[int, ...]:
    """Sorted unique ks; a k above the bank size is clamped (with a warning) or refused."""
    if len(ks) == 0:
        raise MokdError("k-NN: the list of ks is empty; pass at least one k (DINO uses 10 20 100 200)")
    resolved = set()
    for k in ks:
        if int(k) != k or k < 1:
            raise MokdError(f"k-NN: every k must be a positive integer, got {k!r}")
        k = int(k)
        if k > n_train:
            if on_large_k == "error":
                raise MokdError(f"k-NN: k={k} exceeds the {n_train} training samples; use smaller ks "
                                "or on_large_k='clamp'")
            warnings.append(f"k={k} exceeds the {n_train} training samples; using k={n_train}")
            k = n_train
        resolved.add(k)
    return tuple(sorted(resolved))


def check_search_device(device: str) -> None:
    """Fail before any work when k-NN could not search: no faiss installed, or `device` needs GPU support it lacks."""
    _require_faiss()
    _gpu_device(device)


def _require_faiss() -> None:
    if faiss is None:
        raise MokdError(f"k-NN needs faiss, which is not installed: {INSTALL_FAISS}")


def faiss_has_gpu_support() -> bool:
    """Whether the installed faiss wheel was built with CUDA (faiss-cpu lacks the GPU classes)."""
    return faiss is not None and hasattr(faiss, "StandardGpuResources")


def _gpu_device(device: str) -> int | None:
    """GPU ordinal to search on, or None for CPU; 'auto' uses GPU 0 when faiss can."""
    faiss_sees_gpu = faiss_has_gpu_support() and faiss.get_num_gpus() > 0
    if device == "cpu":
        return None
    if device == "auto":
        return 0 if faiss_sees_gpu and torch.cuda.is_available() else None
    if device == "cuda" or device.startswith("cuda:"):
        if not faiss_has_gpu_support():
            raise MokdError(f"k-NN: device {device!r} needs faiss with GPU support, but the installed faiss is "
                            f"CPU-only: {SWITCH_TO_GPU_FAISS}, or use --device cpu")
        if not faiss_sees_gpu:
            raise MokdError(f"k-NN: device {device!r}: the installed faiss has GPU support but sees no GPU "
                            "(check nvidia-smi and CUDA_VISIBLE_DEVICES), or use --device cpu")
        ordinal = device.partition(":")[2]
        if ordinal and not ordinal.isdigit():
            raise MokdError(f"k-NN: device {device!r} is not of the form cuda or cuda:N")
        return int(ordinal or 0)
    raise MokdError(f"k-NN: device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


class _GpuIndex:
    """A FAISS GPU index together with the resources object it must not outlive."""

    def __init__(self, dim: int, fp16_bank: bool, gpu_device: int) -> None:
        self.resources = faiss.StandardGpuResources()
        config = faiss.GpuIndexFlatConfig()
        config.device = gpu_device
        config.useFloat16 = fp16_bank
        self.index = faiss.GpuIndexFlatIP(self.resources, dim, config)

    def add(self, rows: np.ndarray) -> None:
        self.index.add(rows)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)


def _build_index(train_x: np.ndarray | torch.Tensor, fp16_bank: bool, gpu_device: int | None):
    """Exact inner-product index over the normalised bank, filled chunk by chunk."""
    dim = train_x.shape[1]
    if gpu_device is not None:
        index = _GpuIndex(dim, fp16_bank, gpu_device)
    elif fp16_bank:
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexFlatIP(dim)
    if gpu_device is None:
        _reserve_codes(index, len(train_x))
    chunk_rows = max(1, BANK_CHUNK_BYTES // (4 * dim))
    for start in range(0, len(train_x), chunk_rows):
        index.add(_normalised_rows(train_x, start, min(start + chunk_rows, len(train_x)), "train_features"))
    return index


def _reserve_codes(index: faiss.IndexFlatCodes, n_rows: int) -> None:
    """Allocate the CPU index's storage once: growing it chunk by chunk copies it, peaking near 2x the bank.

    Resizing up and back to zero keeps the capacity (std::vector semantics), so later adds fill it in place.
    """
    index.codes.resize(n_rows * index.code_size)
    index.codes.resize(0)


def _normalised_rows(features: np.ndarray | torch.Tensor, start: int, stop: int, name: str) -> np.ndarray:
    """Rows [start, stop) as a new contiguous, finite, L2-normalised float32 array (what FAISS needs).

    Normalised in place in that copy: one staging buffer per chunk, and the caller's array is untouched.
    Torch tensors stay torch until here, so bfloat16 features (which numpy lacks) work too.
    """
    if isinstance(features, torch.Tensor):
        rows = features[start:stop].to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    else:
        rows = torch.from_numpy(np.array(features[start:stop], dtype=np.float32, order="C"))
    if not torch.isfinite(rows).all():
        bad_row = start + int((~torch.isfinite(rows)).any(dim=1).nonzero()[0])
        raise MokdError(f"k-NN: {name} row {bad_row} contains NaN or inf; the checkpoint or extraction "
                        "diverged, re-extract the features")
    return F.normalize(rows, dim=1, out=rows).numpy()


@contextlib.contextmanager
def _faiss_threads(n_threads: int) -> Iterator[None]:
    """Run FAISS with torch's thread count, then restore FAISS's previous setting."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n_threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)
