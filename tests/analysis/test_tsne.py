"""t-SNE: seeded class draw, determinism, shapes, and Procrustes alignment."""

import numpy as np
import pytest

from mokd_analysis.tsne import aligned_embeddings, class_centroids, draw_classes, embed, procrustes_align
from mokd.core.errors import MokdError


def test_class_draw_is_seeded_sorted_and_distinct():
    first = draw_classes(100, 10, seed=0)
    assert first == draw_classes(100, 10, seed=0)
    assert first != draw_classes(100, 10, seed=1)
    assert first == sorted(set(first)) and len(first) == 10 and all(0 <= c < 100 for c in first)
    assert draw_classes(10, 10, seed=3) == list(range(10))


def test_more_classes_than_the_dataset_has_is_refused():
    with pytest.raises(MokdError, match="has 10 classes"):
        draw_classes(10, 11, seed=0)


@pytest.mark.parametrize("engine", ["installed", "scikit-learn"])
def test_embedding_is_deterministic_and_two_dimensional(engine, monkeypatch):
    if engine == "scikit-learn":  # the fallback when openTSNE is absent
        monkeypatch.setattr("mokd_analysis.tsne.engine_name", lambda: "scikit-learn")
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 16)) + np.repeat(rng.normal(size=(3, 16)) * 4, 20, axis=0)
    first, second = embed(features, seed=0), embed(features, seed=0)
    assert first.shape == (60, 2)
    np.testing.assert_array_equal(first, second)


def test_procrustes_recovers_a_rotated_scaled_shifted_copy():
    rng = np.random.default_rng(1)
    target = rng.normal(size=(50, 2))
    labels = np.repeat(np.arange(5), 10)
    angle = 0.7
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = 2.5 * target @ rotation + np.array([3.0, -1.0])
    classes = list(range(5))
    aligned = procrustes_align(moved, class_centroids(moved, labels, classes), class_centroids(target, labels, classes))
    np.testing.assert_allclose(aligned, target, atol=1e-10)
    stacked = aligned_embeddings([target, moved, moved[:, ::-1]], labels, classes)  # a reflected copy too
    assert stacked.shape == (3, 50, 2)
    np.testing.assert_allclose(stacked[1], target, atol=1e-10)
    np.testing.assert_allclose(stacked[2], target, atol=1e-10)
