"""Prediction consistency statistics on constructed predictions with known answers."""

import numpy as np
import pytest

from mokd_analysis.consistency import consistency_stats
from mokd.core.errors import MokdError

LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
PRED_A = np.array([0, 0, 0, 1, 1, 1, 0, 2, 2, 0])  # right on 0,1,2,4,5,8 -> 6/10
PRED_B = np.array([0, 0, 1, 1, 1, 2, 0, 1, 2, 2])  # right on 0,1,4,7,8,9 -> 6/10


def test_agreement_split_kappa_and_per_class_by_hand():
    stats = consistency_stats(PRED_A, PRED_B, LABELS, num_classes=3)
    # equal at 0, 1, 3, 4, 6, 8 -> 6 of 10
    assert stats["agreement"] == pytest.approx(0.6)
    assert stats["accuracy_a"] == pytest.approx(0.6) and stats["accuracy_b"] == pytest.approx(0.6)
    assert stats["split"] == pytest.approx({"both_right": 0.4, "only_a": 0.2, "only_b": 0.2, "both_wrong": 0.2})
    assert stats["both_wrong_same_label"] == pytest.approx(0.2)  # samples 3 and 6
    # kappa = (p_o - p_e) / (1 - p_e); marginals A: 0 x5, 1 x3, 2 x2; B: 0 x3, 1 x4, 2 x3
    p_e = (5 * 3 + 3 * 4 + 2 * 3) / 100
    assert stats["cohen_kappa"] == pytest.approx((0.6 - p_e) / (1 - p_e))
    assert stats["per_class_agreement"] == pytest.approx({"0": 0.75, "1": 0.5, "2": 0.5})
    assert stats["independent_errors_agreement"] == pytest.approx(0.6 * 0.6 + 0.4 * 0.4 / 2)
    assert stats["n"] == 10


def test_identical_predictions_agree_fully():
    stats = consistency_stats(PRED_A, PRED_A, LABELS, num_classes=3)
    assert stats["agreement"] == 1.0 and stats["cohen_kappa"] == pytest.approx(1.0)
    assert stats["split"]["only_a"] == 0.0 and stats["split"]["only_b"] == 0.0


def test_constant_identical_predictions_have_kappa_one_not_nan():
    constant = np.zeros(10, dtype=int)
    assert consistency_stats(constant, constant, LABELS, num_classes=3)["cohen_kappa"] == 1.0


def test_a_class_missing_from_the_split_is_left_out_of_per_class():
    stats = consistency_stats(PRED_A, PRED_B, LABELS, num_classes=5)
    assert set(stats["per_class_agreement"]) == {"0", "1", "2"}


def test_predictions_on_different_validation_sets_are_refused():
    with pytest.raises(MokdError, match="different validation sets"):
        consistency_stats(PRED_A, PRED_B, LABELS, num_classes=3, labels_b=LABELS[::-1])
    with pytest.raises(MokdError, match="different validation sets"):
        consistency_stats(PRED_A, PRED_B, LABELS, num_classes=3, labels_b=LABELS[:5])


def test_unequal_lengths_are_refused():
    with pytest.raises(MokdError, match="equally long"):
        consistency_stats(PRED_A[:9], PRED_B, LABELS, num_classes=3)
