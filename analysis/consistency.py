"""Prediction consistency of two models (MOKD Table 9) and the command logic of `mokd-eval consistency`.

Both models run the same k-NN protocol (own train-set bank, k = 20, T = 0.07) on the same validation set;
consistency is the fraction of validation images on which their predicted labels are equal, right or wrong.
The control row replaces model A by an independently trained model A' of similar accuracy: if the MOKD pair
agrees no more than (A', B) does, the extra agreement comes from both being more accurate, not more similar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from sklearn.metrics import cohen_kappa_score

from mokd.core.checkpoints import LoadedBackbone
from mokd.core.errors import MokdError
from mokd_eval.knn import knn_classify
from mokd.core.pipeline import (FeatureOptions, RunSettings, load_models, model_features, model_record,
                                open_data_for)
from mokd.core.results import StageTimer, build_results, format_table

CONSISTENCY_K = 20
CONSISTENCY_TEMPERATURE = 0.07


def consistency_stats(pred_a: np.ndarray, pred_b: np.ndarray, labels: np.ndarray, *, num_classes: int,
                      labels_b: np.ndarray | None = None) -> dict[str, Any]:
    """Agreement, the 2x2 right/wrong split, Cohen's kappa, per-class agreement and the independent-error baseline.

    `labels_b`, when given, are the labels model B was scored against: they must be the same validation set.
    The independent-error baseline is a*b + (1-a)(1-b)/(C-1): both right by chance, or both wrong on the same
    class with errors spread uniformly over the C-1 wrong classes.
    """
    pred_a, pred_b, labels = (np.asarray(x, dtype=np.int64) for x in (pred_a, pred_b, labels))
    if labels_b is not None and (len(labels_b) != len(labels) or not np.array_equal(labels_b, labels)):
        raise MokdError("the two models were evaluated on different validation sets (labels differ): their "
                        "predictions are not comparable; evaluate both with the same --data")
    if not len(pred_a) == len(pred_b) == len(labels) or len(labels) == 0:
        raise MokdError(f"consistency needs two equally long, non-empty prediction lists; got {len(pred_a)}, "
                        f"{len(pred_b)} predictions for {len(labels)} labels")
    right_a, right_b = pred_a == labels, pred_b == labels
    same = pred_a == pred_b
    acc_a, acc_b = right_a.mean(), right_b.mean()
    split = {"both_right": float((right_a & right_b).mean()), "only_a": float((right_a & ~right_b).mean()),
             "only_b": float((~right_a & right_b).mean()), "both_wrong": float((~right_a & ~right_b).mean())}
    wrong_same = float((~right_a & ~right_b & same).mean())
    per_class = {}
    for label in range(num_classes):
        mask = labels == label
        if mask.any():
            per_class[str(label)] = float(same[mask].mean())
    chance_wrong = 1.0 / (num_classes - 1) if num_classes > 1 else 1.0
    both_constant = len(np.unique(np.concatenate([pred_a, pred_b]))) == 1
    kappa = 1.0 if both_constant else float(cohen_kappa_score(pred_a, pred_b, labels=list(range(num_classes))))
    return {"agreement": float(same.mean()), "accuracy_a": float(acc_a), "accuracy_b": float(acc_b),
            "split": split, "both_wrong_same_label": wrong_same, "cohen_kappa": kappa,
            "independent_errors_agreement": float(acc_a * acc_b + (1 - acc_a) * (1 - acc_b) * chance_wrong),
            "per_class_agreement": per_class, "n": int(len(labels))}


KEY_OPTIONS = {"A": "--key", "B": "--key-b", "control": "--key-control"}


def _one_model(checkpoint: Path, key: str | None, role: str, model: str | None, trust: bool,
               echo: Callable[[str], None]) -> LoadedBackbone:
    loaded = load_models(checkpoint, model=model, key=key, trust=trust, echo=echo)
    if len(loaded) > 1:
        echo(f"{role}: {checkpoint} holds {len(loaded)} models; using '{loaded[0].key}' "
             f"(choose with {KEY_OPTIONS[role]})")
    return loaded[0]


def select_models(checkpoint_a: Path, checkpoint_b: Path | None, control: Path | None, *, keys: Sequence[str | None],
                  model: str | None, trust: bool, echo: Callable[[str], None]) -> list[LoadedBackbone]:
    """[A, B] or [A, B, A']: a pair checkpoint alone gives its two models; otherwise one model per file."""
    key_a, key_b, key_control = keys
    if checkpoint_b is None:
        loaded = load_models(checkpoint_a, model=model, key=key_a, trust=trust, echo=echo)
        if len(loaded) != 2:
            raise MokdError(f"{checkpoint_a} gives {len(loaded)} model(s) ({', '.join(m.key for m in loaded)}): "
                            "compare a pair checkpoint alone (without --key), or give a second checkpoint")
        models = list(loaded)
    else:
        models = [_one_model(checkpoint_a, key_a, "A", model, trust, echo),
                  _one_model(checkpoint_b, key_b, "B", None, trust, echo)]
    if control is not None:
        models.append(_one_model(control, key_control, "control", None, trust, echo))
    return models


def run_consistency(checkpoint_a: Path, checkpoint_b: Path | None, run: RunSettings, *, control: Path | None = None,
                    features: FeatureOptions, key_b: str | None = None, key_control: str | None = None,
                    k: int = CONSISTENCY_K, temperature: float = CONSISTENCY_TEMPERATURE) -> dict[str, Any]:
    """k-NN predictions of A, B (and A') on one validation set, compared; returns the results payload.
    `run.key` picks model A, `key_b` and `key_control` the models of the other two checkpoints."""
    keys = (run.key, key_b, key_control)
    timer = StageTimer()
    with timer.stage("load"):
        models = select_models(checkpoint_a, checkpoint_b, control, keys=keys, model=run.model, trust=run.trust,
                               echo=run.echo)
        eval_data, resolution = open_data_for(models, run)
        run.echo(f"data: {eval_data.spec.text} ({len(eval_data.val)} val images, "
                 f"{eval_data.train.num_classes} classes)")

    num_classes = eval_data.train.num_classes
    results, predictions, val_labels = [], [], []
    for role, entry in zip(("A", "B", "control"), models):
        train, val = model_features(entry, eval_data, features, timer)
        outcome = knn_classify(train.features, train.labels, val.features, val.labels, num_classes=num_classes,
                               ks=(k,), temperature=temperature, device=features.device)
        for stage, seconds in outcome.timings.items():
            timer.add(stage, seconds)
        used_k = outcome.ks[0]
        predictions.append(outcome.predictions[used_k])
        val_labels.append(val.labels)
        results.append({**model_record(entry), "role": role, "metrics": {"knn": {str(used_k): outcome.metrics[used_k]}},
                        "best_k": used_k})

    analysis = {"pair": consistency_stats(predictions[0], predictions[1], val_labels[0], num_classes=num_classes,
                                          labels_b=val_labels[1])}
    if control is not None:
        analysis["control"] = consistency_stats(predictions[2], predictions[1], val_labels[2],
                                                num_classes=num_classes, labels_b=val_labels[1])
    protocol = {"name": "consistency", "k": k, "temperature": temperature, "feature": features.kind.describe(),
                "precision": features.precision, "image_size": eval_data.side, "image_size_from": resolution.source,
                "agreement": "fraction of val images with equal k-NN top-1 predictions",
                "control": "control model A' replaces A" if control is not None else None}
    config = {"checkpoint": str(checkpoint_a), "checkpoint_b": str(checkpoint_b) if checkpoint_b else None,
              "control": str(control) if control else None, "keys": list(keys), "model": run.model,
              "image_size": run.image_size}
    payload = build_results(command="consistency", protocol=protocol, dataset=eval_data.record(), results=results,
                            timings=timer.as_dict(), seed=run.seed, config=config)
    payload["consistency"] = analysis
    return payload


def consistency_table(payload: dict[str, Any]) -> str:
    """Table 9 style: one row per comparison, accuracies of both models, agreement, kappa and the split."""
    names = [f"{entry['key']} ({entry['arch']})" for entry in payload["results"]]
    rows = []
    comparisons = [("pair", names[0], names[1])]
    if "control" in payload["consistency"]:
        comparisons.append(("control", names[2], names[1]))
    for label, name_a, name_b in comparisons:
        stats = payload["consistency"][label]
        split = stats["split"]
        rows.append([f"{label}: {name_a} vs {name_b}", f"{100 * stats['accuracy_a']:.2f}",
                     f"{100 * stats['accuracy_b']:.2f}", f"{stats['agreement']:.3f}",
                     f"{stats['independent_errors_agreement']:.3f}", f"{stats['cohen_kappa']:.3f}",
                     f"{split['both_right']:.3f}", f"{split['only_a']:.3f}", f"{split['only_b']:.3f}",
                     f"{split['both_wrong']:.3f}"])
    headers = ["comparison", "acc A", "acc B", "consistency", "if independent", "kappa", "both right", "only A",
               "only B", "both wrong"]
    title = (f"Prediction consistency on {payload['dataset']['spec']} val "
             f"(k-NN k = {payload['protocol']['k']}, T = {payload['protocol']['temperature']})")
    return format_table(headers, rows, title=title)
