"""t-SNE of frozen features (MOKD Fig. 4/S1) and the command logic of `mokd-eval tsne`.

A seeded draw of classes (stored), features as for k-NN (the one extractor and cache), L2-normalised, each
model embedded separately with the same settings (perplexity 30, PCA init, learning rate "auto", seed 0;
openTSNE when installed, else scikit-learn). Two models' embeddings live in unrelated coordinates, so every
model is aligned to the first by a similarity Procrustes fit on its class centroids before they share axes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.linalg import orthogonal_procrustes

from mokd.core import atomic
from mokd.core.errors import MokdError
from mokd.core.pipeline import (FeatureOptions, RunSettings, load_models, model_record, open_data_for,
                                split_features)
from mokd.core.results import StageTimer, build_results, format_table

PERPLEXITY = 30.0


PAPER_CLASSES = 10  # classes drawn by default (also the default of `mokd-eval tsne --classes`)


def draw_classes(num_classes: int, count: int, seed: int) -> list[int]:
    """`count` distinct classes out of `num_classes`, sorted, from a seeded generator."""
    if count < 1 or count > num_classes:
        raise MokdError(f"--classes {count}: the dataset has {num_classes} classes; choose 1..{num_classes}")
    return sorted(int(c) for c in np.random.default_rng(seed).choice(num_classes, size=count, replace=False))


def engine_name() -> str:
    return "openTSNE" if importlib.util.find_spec("openTSNE") is not None else "scikit-learn"


def effective_perplexity(points: int, requested: float = PERPLEXITY) -> float:
    """The perplexity t-SNE can use on `points` rows: at most (n - 1) / 3, the neighbours a point has."""
    return min(requested, (points - 1) / 3)


def embed(features: np.ndarray, *, seed: int = 0, perplexity: float = PERPLEXITY) -> np.ndarray:
    """2-D t-SNE of L2-normalised rows; perplexity is lowered to (n - 1) / 3 for very small sets."""
    if len(features) < 4:
        raise MokdError(f"t-SNE needs at least 4 points, got {len(features)}; draw more classes or images")
    rows = features.astype(np.float32) / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    perplexity = effective_perplexity(len(rows), perplexity)
    if engine_name() == "openTSNE":
        from openTSNE import TSNE as OpenTSNE

        return np.asarray(OpenTSNE(perplexity=perplexity, initialization="pca", learning_rate="auto",
                                   random_state=seed, n_jobs=1).fit(rows), dtype=np.float64)
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed).fit_transform(rows).astype(np.float64)


def class_centroids(points: np.ndarray, labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    return np.stack([points[labels == c].mean(axis=0) for c in classes])


def procrustes_align(points: np.ndarray, source_centroids: np.ndarray, target_centroids: np.ndarray) -> np.ndarray:
    """Map `points` by the rotation (or reflection), uniform scale and shift that best carry the source centroids
    onto the target centroids in the least-squares sense."""
    source_mean, target_mean = source_centroids.mean(axis=0), target_centroids.mean(axis=0)
    source, target = source_centroids - source_mean, target_centroids - target_mean
    rotation, singular_sum = orthogonal_procrustes(source, target)
    norm = float((source ** 2).sum())
    scale = singular_sum / norm if norm > 0 else 1.0
    return (points - source_mean) @ rotation * scale + target_mean


def aligned_embeddings(embeddings: list[np.ndarray], labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """M x N x 2: every embedding aligned to the first on class centroids."""
    target = class_centroids(embeddings[0], labels, classes)
    aligned = [embeddings[0]] + [procrustes_align(e, class_centroids(e, labels, classes), target)
                                 for e in embeddings[1:]]
    return np.stack(aligned)


def plot_tsne(embeddings: np.ndarray, labels: np.ndarray, classes: Sequence[int], model_names: Sequence[str],
              class_names: Sequence[str], stem: Path) -> dict[str, str]:
    """One axes: colour = class, marker = model; the caption line says the models are Procrustes-aligned."""
    from mokd_analysis import style

    with style.paper_style():
        fig, axes = style.figure(style.COLUMN_WIDTH, 2.6)
        ax = axes[0, 0]
        colours = style.palette(len(classes))
        for m, name in enumerate(model_names):
            for colour, c in zip(colours, classes):
                mask = labels == c
                ax.scatter(embeddings[m, mask, 0], embeddings[m, mask, 1], s=4, c=colour,
                           marker=style.MARKERS[m % len(style.MARKERS)], alpha=0.7, linewidths=0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"t-SNE of {len(classes)} classes")
        model_handles = [ax.scatter([], [], c="k", marker=style.MARKERS[m % len(style.MARKERS)], s=10, label=name)
                         for m, name in enumerate(model_names)]
        class_handles = [ax.scatter([], [], c=colour, marker="o", s=10, label=class_names[c])
                         for colour, c in zip(colours, classes)]
        models_legend = ax.legend(handles=model_handles, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                                  frameon=False, handletextpad=0.1, fontsize=5.5, title="model", title_fontsize=6)
        ax.add_artist(models_legend)
        ax.legend(handles=class_handles, loc="lower left", bbox_to_anchor=(1.02, 0.0), frameon=False,
                  handletextpad=0.1, ncol=2, columnspacing=0.6, fontsize=5.5, title="class", title_fontsize=6)
        if len(model_names) > 1:
            fig.text(0.02, 0.02, "models aligned to the first by Procrustes on class centroids", fontsize=5.5)
        fig.subplots_adjust(left=0.02, right=0.56, bottom=0.09, top=0.91)
        return style.save(fig, stem)


def run_tsne(checkpoints: Sequence[Path], run: RunSettings, *, features: FeatureOptions,
             classes: int | None = PAPER_CLASSES, split: str = "val", out_stem: Path) -> dict[str, Any]:
    """Embed the drawn classes' features of every model, align, plot; write the `.npy` and figures next to
    `out_stem`. Returns the results payload. `classes` None: the paper's 10, or every class of a smaller dataset
    (for the suite, which has no --classes to suggest)."""
    timer = StageTimer()
    with timer.stage("load"):
        models = [entry for checkpoint in checkpoints
                  for entry in load_models(checkpoint, model=run.model, key=run.key, trust=run.trust, echo=run.echo)]
        eval_data, resolution = open_data_for(models, run)
        num_classes = eval_data.train.num_classes
        classes = min(PAPER_CLASSES, num_classes) if classes is None else classes
        drawn = draw_classes(num_classes, classes, run.seed)
    embeddings, labels, results = [], None, []
    for entry in models:
        chosen = split_features(entry, eval_data, split, features, timer, run.echo)
        mask = np.isin(chosen.labels, drawn)
        if labels is not None and not np.array_equal(labels, chosen.labels[mask]):
            raise MokdError("the models' feature sets hold different images; re-extract with the same --data")
        labels = chosen.labels[mask]
        with timer.stage("tsne"):
            embeddings.append(embed(chosen.features[mask], seed=run.seed))
        results.append({**model_record(entry), "metrics": {"tsne": {"points": int(mask.sum())}}})
    assert labels is not None
    perplexity = effective_perplexity(len(labels))
    if perplexity < PERPLEXITY:
        run.echo(f"warning: t-SNE perplexity lowered from {PERPLEXITY:g} to {perplexity:g}: only {len(labels)} points; "
                 "the results record the value used")
    aligned = aligned_embeddings(embeddings, labels, drawn)
    names = [f"{entry.checkpoint.path.stem}:{entry.key} ({entry.spec.name})" for entry in models]
    class_names = list(getattr(eval_data.train, "classes", None) or [str(c) for c in range(num_classes)])
    with timer.stage("plot"):
        figures = plot_tsne(aligned, labels, drawn, names, class_names, out_stem)
    embedding_path = atomic.save_numpy(out_stem.with_name(out_stem.name + ".npy"), aligned.astype(np.float32))
    labels_path = atomic.save_numpy(out_stem.with_name(out_stem.name + ".labels.npy"), labels)
    protocol = {"name": "tsne", "engine": engine_name(), "perplexity": perplexity, "perplexity_requested": PERPLEXITY,
                "init": "pca",
                "learning_rate": "auto", "split": split, "feature": features.kind.describe(),
                "precision": features.precision, "image_size": eval_data.side, "image_size_from": resolution.source,
                "normalisation": "L2", "alignment": "similarity Procrustes on class centroids, to the first model"}
    config = {"checkpoints": [str(c) for c in checkpoints], "model": run.model, "key": run.key,
              "image_size": run.image_size,
              "classes": classes}
    payload = build_results(command="tsne", protocol=protocol, dataset=eval_data.record(), results=results,
                            timings=timer.as_dict(), seed=run.seed, config=config)
    payload["tsne"] = {"classes": drawn, "class_names": [class_names[c] for c in drawn], "models": names,
                       "embedding": str(embedding_path), "labels": str(labels_path), "figures": figures}
    return payload


def tsne_table(payload: dict[str, Any]) -> str:
    rows = [[name, entry["metrics"]["tsne"]["points"]] for name, entry in zip(payload["tsne"]["models"],
                                                                            payload["results"])]
    title = (f"t-SNE ({payload['protocol']['engine']}) of classes {payload['tsne']['classes']} on "
             f"{payload['dataset']['spec']} {payload['protocol']['split']}")
    return format_table(["model", "points"], rows, title=title) + f"\nfigure: {payload['tsne']['figures']['png']}"
