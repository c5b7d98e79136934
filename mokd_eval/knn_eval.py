"""`mokd-eval knn`: DINO's weighted k-NN protocol on every model of a checkpoint, as a results payload."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from mokd.core.checkpoints import LoadedBackbone
from mokd_eval.knn import check_search_device, knn_classify
from mokd.core.pipeline import (FeatureOptions, Resolution, RunSettings, load_models, model_features, model_record,
                                open_data_for, paper_resolution)
from mokd_eval.protocols import PAPER_PRECISION, overall_verdict, paper_verdict, verdict_line
from mokd.core.results import StageTimer, build_results, format_table

# A.2: "implemented based on DINO [...] the best result among k = 10, 20, 100, 200"; DINO's T = 0.07 on the
# backbone's pooled / CLS feature, an fp32 bank.
PAPER_KS = (10, 20, 100, 200)
PAPER_TEMPERATURE = 0.07


def knn_protocol(entry: LoadedBackbone, *, ks: Sequence[int], temperature: float, features: FeatureOptions,
                 side: int, resolution: Resolution, fp16_bank: bool) -> dict[str, Any]:
    """One model's k-NN protocol record, compared with A.2's (DINO's k-NN at the training resolution, fp32)."""
    record = {"command": "knn", "mode": "weighted k-NN", "ks": sorted(ks), "temperature": temperature,
              "feature": features.kind.describe(), "image_size": side, "image_size_from": resolution.source,
              "fp16_bank": fp16_bank, "precision": features.precision}
    reference = {"ks": list(PAPER_KS), "temperature": PAPER_TEMPERATURE, "feature": "default",
                 "image_size": paper_resolution(entry), "fp16_bank": False, "precision": PAPER_PRECISION}
    return paper_verdict(record, reference)


def run_knn(checkpoint: str | Path, run: RunSettings, *, ks: Sequence[int], temperature: float,
            features: FeatureOptions, fp16_bank: bool = False) -> dict[str, Any]:
    """Evaluate each selected model of `checkpoint` and return the results payload (not yet written)."""
    check_search_device(features.device)
    timer = StageTimer()
    with timer.stage("load"):
        loaded = load_models(checkpoint, model=run.model, key=run.key, trust=run.trust, echo=run.echo,
                             image_size=run.image_size)
        eval_data, resolution = open_data_for(loaded, run, data_line=lambda data: data.summary(transform=True))

    results, warnings = [], []
    for entry in loaded:
        train, val = model_features(entry, eval_data, features, timer, run.echo)
        outcome = knn_classify(train.features, train.labels, val.features, val.labels,
                               num_classes=eval_data.train.num_classes, ks=ks, temperature=temperature,
                               fp16_bank=fp16_bank, device=features.device)
        for stage, seconds in outcome.timings.items():
            timer.add(stage, seconds)
        warnings.extend(outcome.warnings)
        metrics = {str(k): values for k, values in outcome.metrics.items()}
        results.append({**model_record(entry), "metrics": {"knn": metrics}, "best_k": outcome.best_k,
                        "protocol": knn_protocol(entry, ks=ks, temperature=temperature, features=features,
                                                 side=eval_data.side, resolution=resolution, fp16_bank=fp16_bank),
                        "feature_rate_images_per_s": round(train.images_per_second, 1) if not train.from_cache else None,
                        "features_from_cache": train.from_cache and val.from_cache,
                        "skipped_images": train.skipped + val.skipped})
    for message in dict.fromkeys(warnings):
        run.echo(f"warning: {message}")

    protocol = {"name": "knn", "command": "knn", "ks": list(ks), "temperature": temperature,
                "feature": features.kind.describe(), "image_size": eval_data.side, "image_size_from": resolution.source,
                "similarity": "cosine (L2-normalised features)", "vote": "sum of exp(sim / T) per class",
                "fp16_bank": fp16_bank, "precision": features.precision, "num_classes_from": "train split",
                **overall_verdict([entry["protocol"] for entry in results])}
    config = {"checkpoint": str(checkpoint), "model": run.model, "key": run.key, "image_size": run.image_size,
              "batch_size": features.batch_size, "device": features.device,
              "cache_dir": str(features.cache.root) if features.cache.root else None}
    return build_results(command="knn", protocol=protocol, dataset=eval_data.record(), results=results,
                         timings=timer.as_dict(), seed=run.seed, config=config)


def knn_table(payload: dict[str, Any]) -> str:
    """k rows, one top-1/top-5 column pair per model (Net1/Net2 side by side); best k starred."""
    models = payload["results"]
    ks = sorted({int(k) for entry in models for k in entry["metrics"]["knn"]})
    headers = ["k"]
    for entry in models:
        headers += [f"{entry['key']} top1", "top5"]
    rows = []
    for k in ks:
        row: list[Any] = [str(k)]
        for entry in models:
            values = entry["metrics"]["knn"].get(str(k))
            if values is None:
                row += ["-", "-"]
                continue
            star = "*" if entry["best_k"] == k else ""
            row += [f"{values['top1']:.2f}{star}", f"{values['top5']:.2f}"]
        rows.append(row)
    title = f"k-NN on {payload['dataset']['spec']} (T = {payload['protocol']['temperature']}; * = best k)"
    archs = "  ".join(f"{entry['key']}: {entry['arch']}" for entry in models)
    return format_table(headers, rows, title=title) + f"\n{archs}\n{verdict_line(payload['protocol'])}"
