"""Split files (SimCLR's format), stratified subsets and held-out slices."""

from pathlib import Path

import numpy as np
import pytest

from mokd.core.errors import MokdError
from mokd_eval.splits import (expected_count, heldout_split, read_split_file, stratified_subset,
                              write_split_file)

NAMES = [f"n{c:03d}_{i:04d}.JPEG" for c in range(5) for i in range(40)]  # 200 images, 5 classes


def test_expected_count_gives_simclr_imagenet_counts():
    assert expected_count(1_281_167, 1) == 12_811
    assert expected_count(1_281_167, 10) == 128_116
    assert expected_count(200, 10) == 20


def test_split_file_round_trip_and_order_independence(tmp_path: Path):
    path = tmp_path / "10percent.txt"
    chosen = [NAMES[i] for i in (150, 3, 77, 12, 199, 0, 41, 88, 120, 160, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15)]
    path.write_text("\n".join(chosen) + "\n\n")  # a trailing blank line is fine
    indices = read_split_file(path, NAMES, percent=10)
    assert indices.tolist() == sorted(NAMES.index(name) for name in chosen)


def test_split_file_with_unknown_names_lists_them(tmp_path: Path):
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(NAMES[:18] + ["missing_1.JPEG", "missing_2.JPEG"]))
    with pytest.raises(MokdError, match=r"2 of 20 names are not in the training set \(missing_1.JPEG, missing_2"):
        read_split_file(path, NAMES, percent=10)


def test_split_file_with_the_wrong_count(tmp_path: Path):
    path = tmp_path / "short.txt"
    path.write_text("\n".join(NAMES[:19]))
    with pytest.raises(MokdError, match="lists 19 images, but 10% of the 200 training images is 20"):
        read_split_file(path, NAMES, percent=10)
    assert len(read_split_file(path, NAMES, percent=None)) == 19  # no --percent check asked for


@pytest.mark.parametrize("text, message", [("", "lists no names"), ("a.JPEG\na.JPEG", "twice")])
def test_split_file_empty_or_duplicated(tmp_path: Path, text: str, message: str):
    path = tmp_path / "s.txt"
    path.write_text(text)
    with pytest.raises(MokdError, match=message):
        read_split_file(path, NAMES + ["a.JPEG"], percent=None)


def test_missing_split_file(tmp_path: Path):
    with pytest.raises(MokdError, match="does not exist"):
        read_split_file(tmp_path / "nope.txt", NAMES, percent=1)


def test_stratified_subset_is_exact_proportional_seeded_and_reusable(tmp_path: Path):
    labels = np.repeat(np.arange(4), [100, 60, 30, 10])  # 200 images
    subset = stratified_subset(labels, 10, seed=3)
    assert len(subset) == 20 and len(set(subset.tolist())) == 20
    assert np.bincount(labels[subset], minlength=4).tolist() == [10, 6, 3, 1]  # exactly proportional here
    assert np.array_equal(subset, stratified_subset(labels, 10, seed=3))
    assert not np.array_equal(subset, stratified_subset(labels, 10, seed=4))
    names = [f"img_{i}.png" for i in range(200)]
    path = write_split_file(tmp_path / "split.txt", names, subset)
    assert np.array_equal(read_split_file(path, names, percent=10), subset)


def test_stratified_subset_keeps_every_class_and_the_exact_total():
    labels = np.repeat(np.arange(10), [500, 200, 100, 50, 40, 30, 20, 10, 3, 1])  # 954 images
    subset = stratified_subset(labels, 1, seed=0)
    assert expected_count(954, 1) == 9  # fewer than the 10 classes: one image each instead
    assert len(subset) == 10 and set(labels[subset].tolist()) == set(range(10))
    subset10 = stratified_subset(labels, 10, seed=0)
    counts = np.bincount(labels[subset10], minlength=10)
    assert len(subset10) == 95 and counts.min() >= 1
    assert counts[0] >= 45  # the largest class keeps its share (50 by proportion, less what the 1-floors took)


def test_stratified_subset_rejects_a_missing_class():
    with pytest.raises(MokdError, match="only 2 of its 3 classes"):
        stratified_subset(np.array([0, 0, 1, 1]), 50, seed=0, num_classes=3)


def test_heldout_split_is_disjoint_seeded_and_per_class():
    labels = np.repeat(np.arange(3), [20, 10, 1])
    fit, held = heldout_split(labels, 0.1, seed=1)
    assert set(fit) | set(held) == set(range(31)) and not set(fit) & set(held)
    assert np.bincount(labels[held], minlength=3).tolist() == [2, 1, 0]  # the single-image class stays in fit
    assert np.array_equal(held, heldout_split(labels, 0.1, seed=1)[1])
    with pytest.raises(MokdError, match="too few"):
        heldout_split(np.arange(3), 0.1, seed=0)
