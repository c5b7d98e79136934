"""Labelled subsets: SimCLR's 1%/10% split files, seeded class-stratified subsets, and held-out slices.

A split file is SimCLR's format: one training image file name per line (ImageNet 1% = 12,811 names,
10% = 128,116). Its expected size is floor(N x percent / 100) of the N training images, which gives exactly
SimCLR's counts on ImageNet's 1,281,167 images. Held-out slices are what every hyper-parameter choice is made
on: they come from the training data, never from the validation set.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from mokd.core import atomic
from mokd.core.errors import MokdError

ALLOWED_PERCENTS = (1, 10)
_SHOWN_MISSING = 5


def expected_count(train_size: int, percent: float) -> int:
    """floor(N x percent / 100): SimCLR's 12,811 / 128,116 on ImageNet's 1,281,167 training images."""
    return math.floor(train_size * percent / 100 + 1e-9)


def read_split_file(path: str | Path, names: Sequence[str], *, percent: float | None) -> np.ndarray:
    """Indices (sorted) of the training items a split file lists, after checking every name and the count."""
    path = Path(path)
    if path.is_dir():
        raise MokdError(f"--split-file {path} is a directory: pass the list file inside it (one file name per line)")
    if not path.is_file():
        raise MokdError(f"--split-file {path} does not exist: pass a SimCLR-style list (one file name per line)")
    try:  # utf-8-sig: a byte-order mark (Windows editors) is not part of the first name
        listed = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise MokdError(f"cannot read split file {path} ({error}): it must be text, one file name per line") from None
    if not listed:
        raise MokdError(f"split file {path} lists no names: it must hold one training image file name per line")
    duplicates = sorted({name for name in listed if listed.count(name) > 1}) if len(set(listed)) < len(listed) else []
    if duplicates:
        raise MokdError(f"split file {path} lists {len(duplicates)} names twice (e.g. {', '.join(duplicates[:3])})")
    index_of = {name: index for index, name in enumerate(names)}
    if len(index_of) < len(names):
        raise MokdError("the training set has several images with the same file name, so a split file of file "
                        "names cannot identify them; rename them or use a stratified subset (no --split-file)")
    missing = [name for name in listed if name not in index_of]
    if missing:
        shown = ", ".join(missing[:_SHOWN_MISSING]) + (", ..." if len(missing) > _SHOWN_MISSING else "")
        raise MokdError(f"split file {path}: {len(missing)} of {len(listed)} names are not in the training set "
                        f"({shown}); is it the split of this dataset?")
    if percent is not None:
        expected = expected_count(len(names), percent)
        if len(listed) != expected:
            raise MokdError(f"split file {path} lists {len(listed)} images, but {percent:g}% of the {len(names)} "
                            f"training images is {expected}: check --percent and the file")
    return np.sort(np.array([index_of[name] for name in listed], dtype=np.int64))


def stratified_subset(labels: np.ndarray, percent: float, seed: int, num_classes: int | None = None) -> np.ndarray:
    """Exactly `expected_count` indices (sorted), every class present at least once, the rest in proportion to
    class size (largest remainders), drawn with a seeded generator: the same seed gives the same subset."""
    labels = np.asarray(labels)
    classes, sizes = np.unique(labels, return_counts=True)
    if num_classes is not None and len(classes) < num_classes:
        raise MokdError(f"the training set has images of only {len(classes)} of its {num_classes} classes")
    total = max(expected_count(len(labels), percent), len(classes))
    share = sizes * total / len(labels)
    quota = np.maximum(np.floor(share).astype(np.int64), 1)
    quota = np.minimum(quota, sizes)
    while quota.sum() > total:  # the one-per-class floor overshot: take back from the largest quotas
        quota[np.argmax(quota - (quota == 1) * len(labels))] -= 1
    remainder = share - np.floor(share)
    for position in np.argsort(-remainder, kind="stable"):
        if quota.sum() == total:
            break
        if quota[position] < sizes[position]:
            quota[position] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == label), size=count, replace=False)
              for label, count in zip(classes, quota)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def write_split_file(path: str | Path, names: Sequence[str], indices: np.ndarray) -> Path:
    """Save a subset in SimCLR's format so it can be passed back with --split-file."""
    return atomic.write_text(path, "".join(f"{names[index]}\n" for index in indices))


def heldout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) positions into `labels`: a seeded slice of about `fraction` of every class with at least two
    items (at least one each), so that hyper-parameters are chosen without the validation set."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        count = min(max(1, round(fraction * len(members))), len(members) - 1)
        held.append(rng.choice(members, size=count, replace=False))
    if not held:
        raise MokdError("too few labelled images to hold any out for choosing the learning rate: "
                        "give one --lr value or more labelled images")
    heldout = np.sort(np.concatenate(held))
    fit = np.setdiff1d(np.arange(len(labels)), heldout)
    return fit.astype(np.int64), heldout.astype(np.int64)


def kfold_split(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """`folds` disjoint held-out position sets covering every item: each class is shuffled (seeded) and dealt
    round-robin, continuing where the previous class stopped, so every fold holds about 1/folds of each class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    dealt = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        assignment[members] = (dealt + np.arange(len(members))) % folds
        dealt += len(members)
    return [np.flatnonzero(assignment == fold).astype(np.int64) for fold in range(folds)]
