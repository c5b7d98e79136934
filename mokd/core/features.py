"""The one feature extractor every evaluation uses, and its on-disk cache.

Extraction is batched under `torch.inference_mode`, channels_last for CNNs, in fp32 (DINO's precision) unless
bf16 / fp16 autocast is asked for on CUDA.
Under `torchrun` each rank extracts a strided shard and the shards are gathered back into dataset order.
The cache makes a second evaluation of the same checkpoint run no forward pass at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from mokd.core import atomic
from mokd.core.data import NormalizedImage
from mokd.core.distributed import choose_device
from mokd.core.errors import MokdError
from mokd.core.registry import ArchSpec
from mokd.core.resources import available_cores, extraction_workers
from mokd.core.training_loop import autocast_for

CACHE_FORMAT_VERSION = 3  # 2: manifests carry a labels checksum; 3: ImageFolder resize + crop is one box resize
DEFAULT_CACHE_DIR = Path(os.environ.get("MOKD_CACHE_DIR", Path.home() / ".cache" / "mokd"))


@dataclass(frozen=True)
class FeatureKind:
    """Which vector represents an image.

    `default`: pooled vector (CNN) or CLS after the final norm (ViT), as k-NN uses.
    `patch_mean`: mean of the patch tokens after the final norm (ViT; a CNN's pooled vector already is one).
    `last_cls`: CLS tokens of the last `n_last` blocks, each normalised, concatenated (DINO's linear probe, ViT
    only); with `pool_patches` the mean of the last block's normalised patch tokens is appended (DINO's ViT-B
    recipe, `last_cls:N+avgpool`).
    """

    name: str = "default"
    n_last: int = 1
    pool_patches: bool = False

    @classmethod
    def parse(cls, text: str) -> "FeatureKind":
        if text in ("default", "patch_mean"):
            return cls(text)
        if text.startswith("last_cls:"):
            count, plus, pooling = text.split(":", 1)[1].partition("+")
            if count.isdigit() and int(count) >= 1 and (not plus or pooling == "avgpool"):
                return cls("last_cls", int(count), bool(plus))
        raise MokdError(f"unknown feature type {text!r}: use default, patch_mean, last_cls:N or last_cls:N+avgpool "
                        "(e.g. last_cls:4)")

    def describe(self) -> str:
        if self.name != "last_cls":
            return self.name
        return f"last_cls:{self.n_last}" + ("+avgpool" if self.pool_patches else "")

    def dim(self, spec: ArchSpec) -> int:
        """Length of the feature vector this kind gives for `spec`."""
        if self.name != "last_cls" or not spec.is_vit:
            return spec.feature_dim
        return spec.embed_dim * (self.n_last + int(self.pool_patches))


def feature_function(backbone: nn.Module, spec: ArchSpec, kind: FeatureKind) -> Callable[[torch.Tensor], torch.Tensor]:
    """Map a batch of images to feature vectors of the requested kind."""
    if kind.name == "default":
        return backbone
    if not spec.is_vit:
        if kind.name == "patch_mean":
            return backbone
        raise MokdError(f"feature type {kind.describe()} needs a ViT; {spec.name} is a ResNet")
    if kind.name == "patch_mean":
        return lambda images: backbone.forward_features(images)[:, 1:].mean(dim=1)
    if spec.depth and kind.n_last > spec.depth:  # timm would fail on an assert deep inside
        raise MokdError(f"--feature {kind.describe()}: {spec.name} has {spec.depth} blocks; "
                        f"use last_cls:1 to last_cls:{spec.depth}")

    def last_cls(images: torch.Tensor) -> torch.Tensor:
        outputs = backbone.forward_intermediates(images, indices=kind.n_last, return_prefix_tokens=True, norm=True,
                                                 output_fmt="NLC", intermediates_only=True)
        parts = [prefix[:, 0] for _, prefix in outputs]
        if kind.pool_patches:
            parts.append(outputs[-1][0].mean(dim=1))
        return torch.cat(parts, dim=-1)

    return last_cls


@dataclass
class FeatureSet:
    features: np.ndarray  # N×D
    labels: np.ndarray  # N, int64
    skipped: int  # unreadable images dropped (only with --skip-bad-images)
    seconds: float
    from_cache: bool

    @property
    def images_per_second(self) -> float:
        return len(self.labels) / self.seconds if self.seconds > 0 else float("inf")


class _Indexed(Dataset):
    """Yields (index, item) so shards can be put back in order and unreadable items (None) dropped."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


def _collate(batch: list[tuple[int, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    kept = [(index, item) for index, item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0, dtype=torch.long), torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    indices = torch.tensor([index for index, _ in kept], dtype=torch.long)
    images = torch.stack([item[0] for _, item in kept])
    labels = torch.tensor([int(item[1]) for _, item in kept], dtype=torch.long)
    return indices, images, labels, skipped


def extract_features(backbone: nn.Module, spec: ArchSpec, dataset: Dataset, kind: FeatureKind = FeatureKind(), *,
                     batch_size: int = 256, num_workers: int | None = None, device: str = "auto",
                     precision: str = "fp32", desc: str = "features") -> FeatureSet:
    """Run the frozen backbone over `dataset` and return features and labels in dataset order."""
    torch_device = choose_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if num_workers is None:
        num_workers = extraction_workers(available_cores(), torch_device.type,
                                         decodes_files=bool(getattr(dataset, "decodes_files", False)))
    dataset, normalize_batch = _pixels_and_batch_normalization(dataset, torch_device)
    shard = Subset(_Indexed(dataset), range(rank, len(dataset), world)) if distributed else _Indexed(dataset)
    loader = _batches(shard, batch_size, num_workers, torch_device)

    is_cnn = not spec.is_vit
    model = backbone.to(torch_device).eval()
    if is_cnn:
        model = model.to(memory_format=torch.channels_last)
    forward = feature_function(model, spec, kind)
    autocast, _ = autocast_for(torch_device, precision)

    chunks, label_chunks, index_chunks, skipped = [], [], [], 0
    start = time.perf_counter()
    with torch.inference_mode(), tqdm(total=len(shard), desc=desc, unit="img", disable=rank != 0,
                                      leave=False, dynamic_ncols=True) as bar:
        for indices, images, labels, n_skipped in loader:
            skipped += n_skipped
            bar.update(len(indices) + n_skipped)
            if len(indices) == 0:
                continue
            images = images.to(torch_device, non_blocking=True)
            if normalize_batch is not None:
                images = normalize_batch(images)  # channels_last, as the CNN wants it
            images = images.contiguous(memory_format=torch.channels_last if is_cnn else torch.contiguous_format)
            with autocast:
                output = forward(images)
            chunks.append(output.float().cpu())
            label_chunks.append(labels)
            index_chunks.append(indices)
    if not chunks:
        raise MokdError(f"{desc}: no readable images in the dataset")
    features = torch.cat(chunks).numpy()
    labels = torch.cat(label_chunks).numpy()
    indices = torch.cat(index_chunks).numpy()
    if distributed:
        features, labels, indices, skipped = _gather(features, labels, indices, skipped)
    order = np.argsort(indices, kind="stable")
    return FeatureSet(features[order], labels[order].astype(np.int64), skipped, time.perf_counter() - start, False)


def _batches(shard: Dataset, batch_size: int, num_workers: int, device: torch.device) -> Iterable[tuple]:
    """Collated batches in order: from `num_workers` loader processes that overlap the forward, or, with none,
    loaded between two forwards by as many threads as torch computes with (PIL releases the GIL while it decodes
    and resizes) rather than one image at a time on one core: the CPU default for image files
    (`extraction_workers`, docs/gpu.md#extraction-on-cpu)."""
    if num_workers > 0:
        return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate,
                          pin_memory=device.type == "cuda", persistent_workers=False)
    return _threaded_batches(shard, batch_size, max(1, torch.get_num_threads()))


def _threaded_batches(shard: Dataset, batch_size: int, threads: int) -> Iterator[tuple]:
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mokd-load") as pool:
        for start in range(0, len(shard), batch_size):
            yield _collate(list(pool.map(shard.__getitem__, range(start, min(start + batch_size, len(shard))))))


def _pixels_and_batch_normalization(dataset: Dataset, device: torch.device
                                    ) -> tuple[Dataset, Callable[[torch.Tensor], torch.Tensor] | None]:
    """Under the evaluation transform, the loader workers stop at 8-bit pixels and each batch is normalised on
    `device`: the same floats, a quarter of the bytes between processes and to the GPU, and on CUDA the float
    work off the cores that decode."""
    transform = getattr(dataset, "transform", None)
    if isinstance(transform, NormalizedImage) and hasattr(dataset, "with_transform"):
        return dataset.with_transform(transform.pixels), transform.batch_normalizer(device)
    return dataset, None


def _gather(features: np.ndarray, labels: np.ndarray, indices: np.ndarray,
            skipped: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (features, labels, indices, skipped))
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]), sum(p[3] for p in parts))


class FeatureCache:
    """Features on disk, keyed by everything that determines them.

    An entry is `<key>.features.npy`, `<key>.labels.npy` and `<key>.json`; the manifest is written last, so
    an interrupted or concurrent write never leaves an entry that looks complete. `root=None` disables it.
    """

    def __init__(self, root: str | Path | None, dtype: str = "float32") -> None:
        if dtype not in ("float32", "float16"):
            raise MokdError(f"cache dtype must be float32 or float16, not {dtype!r}")
        self.root = Path(root).expanduser() if root is not None else None
        self.dtype = dtype

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        blob = json.dumps({"cache_format": CACHE_FORMAT_VERSION, **parts}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _paths(self, key: str) -> tuple[Path, Path, Path]:
        assert self.root is not None
        folder = self.root / key[:2]
        return folder / f"{key}.features.npy", folder / f"{key}.labels.npy", folder / f"{key}.json"

    def load(self, key: str, *, expected_labels: np.ndarray | None = None) -> FeatureSet | None:
        """The entry `key`, or None when there is none. A damaged entry (unreadable or inconsistent files, a
        manifest that is not one, labels that differ from the dataset's, non-finite features) is reported with
        its path, removed and treated as absent, so it is recomputed instead of failing every run."""
        if self.root is None:
            return None
        features_path, labels_path, manifest_path = self._paths(key)
        if not manifest_path.exists():
            return None
        try:
            return self._read_entry(key, expected_labels)
        except _DamagedEntry as damage:
            _report(f"feature cache entry {manifest_path} is damaged ({damage}); discarded, recomputing")
            self.discard(key)
            return None

    def _read_entry(self, key: str, expected_labels: np.ndarray | None) -> FeatureSet:
        features_path, labels_path, manifest_path = self._paths(key)
        try:
            manifest = json.loads(manifest_path.read_text())
            features = np.load(features_path, allow_pickle=False)
            labels = np.load(labels_path, allow_pickle=False)
        except Exception as error:  # numpy raises ValueError, EOFError, OSError... for damaged files
            raise _DamagedEntry(f"{type(error).__name__}: {error}") from None
        if not isinstance(manifest, dict) or not _MANIFEST_FIELDS <= manifest.keys() or manifest["key"] != key:
            raise _DamagedEntry("the manifest is not a mokd feature-cache manifest for this entry")
        if features.ndim != 2 or list(features.shape) != manifest["shape"] or str(features.dtype) != manifest["dtype"]:
            raise _DamagedEntry(f"features {features.shape} {features.dtype} do not match the manifest")
        if labels.shape != (features.shape[0],) or labels.dtype != np.int64:
            raise _DamagedEntry(f"labels {labels.shape} {labels.dtype} do not match the features")
        skipped, seconds = manifest["skipped"], manifest["seconds"]
        if not isinstance(skipped, int) or skipped < 0 or not isinstance(seconds, (int, float)):
            raise _DamagedEntry("the manifest's skipped count or timing is not a number")
        if expected_labels is not None and skipped == 0 and not np.array_equal(labels, expected_labels):
            raise _DamagedEntry("its labels differ from the dataset's")
        if zlib.crc32(labels.tobytes()) != manifest["labels_crc32"]:
            raise _DamagedEntry("its labels do not match their checksum")
        if not np.isfinite(features).all():
            raise _DamagedEntry("it holds non-finite features")
        return FeatureSet(features, labels, skipped, float(seconds), True)

    def discard(self, key: str) -> None:
        """Remove an entry, manifest first so that no reader sees it as complete meanwhile."""
        features_path, labels_path, manifest_path = self._paths(key)
        for path in (manifest_path, features_path, labels_path):
            path.unlink(missing_ok=True)

    def store(self, key: str, feature_set: FeatureSet, parts: dict[str, Any]) -> None:
        if self.root is None:
            return
        features_path, labels_path, manifest_path = self._paths(key)
        features = feature_set.features.astype(self.dtype, copy=False)
        atomic.save_numpy(features_path, features)
        atomic.save_numpy(labels_path, feature_set.labels)
        atomic.write_json(manifest_path, {"key": key, "parts": parts, "shape": list(features.shape),
                                          "dtype": self.dtype, "skipped": feature_set.skipped,
                                          "seconds": feature_set.seconds,
                                          "labels_crc32": zlib.crc32(feature_set.labels.tobytes())})


def cached_features(backbone: nn.Module, spec: ArchSpec, dataset: Dataset, *, identity: dict[str, Any],
                    cache: FeatureCache, kind: FeatureKind = FeatureKind(), batch_size: int = 256,
                    num_workers: int | None = None, device: str = "auto", precision: str = "fp32",
                    desc: str = "features") -> FeatureSet:
    """Features from the cache when `identity` (checkpoint hash, model key, dataset fingerprint, split,
    transform...) matches an entry; otherwise extract them and store them."""
    parts = {**identity, "arch": spec.to_dict(), "feature": kind.describe(), "dtype": cache.dtype,
             "precision": precision}
    key = FeatureCache.key(parts)
    skipping = bool(getattr(dataset, "skip_bad_images", False))
    hit = cache.load(key, expected_labels=getattr(dataset, "targets", None))
    if hit is not None and (hit.skipped == 0 or skipping):
        return hit
    if hit is not None:
        # What an entry skipped is part of what it is: a strict run must see (and fail on) those images.
        _report(f"{desc}: the cached features skipped {hit.skipped} unreadable images; this run does not pass "
                f"--skip-bad-images, so they are extracted again")
    feature_set = extract_features(backbone, spec, dataset, kind, batch_size=batch_size, num_workers=num_workers,
                                   device=device, precision=precision, desc=desc)
    if not np.isfinite(feature_set.features).all():
        bad_rows = int((~np.isfinite(feature_set.features)).any(axis=1).sum())
        raise MokdError(f"{desc}: the model produced non-finite features for {bad_rows} images, so its weights are "
                        f"probably non-finite: check the checkpoint (mokd-eval inspect) or evaluate an earlier one")
    if not dist.is_initialized() or dist.get_rank() == 0:
        cache.store(key, feature_set, parts)
    return feature_set


class _DamagedEntry(Exception):
    """Why a cache entry cannot be trusted (internal: the entry is discarded and recomputed)."""


_MANIFEST_FIELDS = {"key", "shape", "dtype", "skipped", "seconds", "labels_crc32"}


def _report(message: str) -> None:
    """Warnings of the cache go to stderr next to the progress bars, whatever command runs."""
    tqdm.write(f"warning: {message}", file=sys.stderr)
