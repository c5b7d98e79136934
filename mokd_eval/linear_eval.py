"""`mokd-eval linear`: linear probing of every model of a checkpoint, as a results payload.

`protocol` mode is DINO's / the paper's recipe (A.2) through the one training engine: augmented images, the
frozen backbone in eval mode, a plain Linear on the protocol's feature, and afterwards the proof that the
backbone did not change. `cached` mode trains a sweep of heads on the cached features (the cache `knn` reads)
and picks the winner on a held-out slice of the training set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from mokd_eval import atomic
from mokd_eval.checkpoints import LoadedBackbone
from mokd_eval.data import image_side, train_transform
from mokd_eval.distributed import DistContext
from mokd_eval.errors import MokdError
from mokd_eval.features import FeatureKind
from mokd_eval.finetune import Classifier
from mokd_eval.linear import (LINEAR_BASE_LR, SWEEP_FACTORS, evaluate_head, protocol_feature, save_head, snapshot,
                              sweep_source_feature, sweep_variants, train_head_sweep, variant_columns,
                              verify_unchanged)
from mokd_eval.pipeline import EvalData, FeatureOptions, load_models, model_features, model_record, open_eval_data
from mokd_eval.protocols import Preset, TrainOptions, resolve_settings, run_root, train_with_search
from mokd_eval.results import StageTimer, build_results, format_table
from mokd_eval.splits import heldout_split
from mokd_eval.validation import check_image_size

MODES = ("protocol", "cached")
LINEAR_EPOCHS, LINEAR_BATCH, LINEAR_WARMUP = 100, 2048, 10  # A.2


def linear_preset(loaded: LoadedBackbone) -> Preset:
    family = "vit" if loaded.spec.is_vit else "resnet"
    return Preset(epochs=LINEAR_EPOCHS, batch_size=LINEAR_BATCH, warmup_epochs=LINEAR_WARMUP, lr=LINEAR_BASE_LR[family])


def run_linear(checkpoint: str | Path, *, mode: str, data: str | None, features: FeatureOptions,
               feature_given: bool, options: TrainOptions, out: Path, context: DistContext,
               model: str | None = None, key: str | None = None, trust: bool = False, image_size: int | None = None,
               skip_bad_images: bool = False, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Linear-probe each selected model of `checkpoint`; returns the results payload (not yet written)."""
    if mode not in MODES:
        raise MokdError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    timer = StageTimer()
    with timer.stage("load"):
        eval_data = open_eval_data(data, image_size=image_size, skip_bad_images=skip_bad_images, echo=echo)
        echo(f"data: {eval_data.spec.text} ({len(eval_data.train)} train / {len(eval_data.val)} val images, "
             f"{eval_data.train.num_classes} classes)")
        loaded = load_models(checkpoint, model=model, key=key, trust=trust, echo=echo)
        for entry in loaded:  # every model must take the resolution before any work
            check_image_size(image_side(eval_data.spec, image_size), entry.spec)
    root = run_root(out)
    results, warnings = [], []
    for entry in loaded:
        requested = features.kind if feature_given else None
        if mode == "cached":
            record, notes = _cached(entry, eval_data, features, requested, options, image_size, root / entry.key,
                                    context, timer)
        else:
            record, notes = _protocol(entry, eval_data, requested, options, image_size, root / entry.key, context,
                                      timer, echo)
        warnings.extend(notes)
        results.append({**model_record(entry), **record})
    for message in dict.fromkeys(warnings):
        echo(f"warning: {message}")
    protocol = {"name": "linear", "mode": mode, "classifier": "Linear, N(0, 0.01) weights, zero bias, no BN",
                "optimizer": "SGD momentum 0.9, weight decay 0, lr x batch/256, linear warm-up then cosine",
                "selection": ("held-out slice of the training set" if mode == "cached"
                              else "held-out slice of the training set when several --lr are given"),
                "num_classes_from": "train split"}
    config = {"checkpoint": str(checkpoint), "model": model, "key": key, "image_size": image_size,
              "device": features.device, "run_dir": str(root), "resume": options.resume,
              "cache_dir": str(features.cache.root) if features.cache.root else None}
    return build_results(command="linear", protocol=protocol, dataset=eval_data.record(), results=results,
                         timings=timer.as_dict(), seed=options.seed, config=config)


def _protocol(entry: LoadedBackbone, eval_data: EvalData, requested: FeatureKind | None, options: TrainOptions,
              image_size: int | None, run_dir: Path, context: DistContext, timer: StageTimer,
              echo: Callable[[str], None]) -> tuple[dict[str, Any], list[str]]:
    kind = requested or protocol_feature(entry.spec)
    preset = linear_preset(entry)
    settings, warnings = resolve_settings(preset, options, len(eval_data.train))
    augment, augment_text = train_transform(eval_data.spec, image_size)
    train_set = eval_data.train.with_transform(augment)
    before = snapshot(entry.module)
    what = f"{entry.checkpoint.path} '{entry.key}'"

    def make_model() -> Classifier:
        torch.manual_seed(options.seed)
        return Classifier(entry.module, entry.spec, kind, eval_data.train.num_classes, frozen=True)

    with timer.stage("train"):
        outcome = train_with_search(
            make_model=make_model, train_set=train_set, train_eval_set=eval_data.train, labels=eval_data.train.targets,
            val_set=eval_data.val, settings=settings, lrs=options.lrs or (preset.lr,), options=options,
            run_dir=run_dir, context=context, desc=f"{entry.key} linear",
            signature={"num_classes": eval_data.train.num_classes, "feature": kind.describe(), "mode": "protocol",
                       "data": eval_data.train.fingerprint},
            after_fit=lambda model: verify_unchanged(model.backbone, before, what), echo=echo)
    head_path = run_dir / "head.pt"
    if context.is_main:
        save_head(head_path, outcome.model.head, feature=kind, spec=entry.spec, classes=eval_data.train.classes,
                  source=_source(entry, eval_data, "protocol"))
    protocol = {"mode": "protocol", "feature": kind.describe(), "train_transform": augment_text,
                "eval_transform": eval_data.transform, "image_size": image_side(eval_data.spec, image_size),
                "backbone_unchanged": True,
                **outcome.protocol()}
    return {"metrics": {"linear": outcome.metrics}, "protocol": protocol, "head": str(head_path)}, warnings


def _cached(entry: LoadedBackbone, eval_data: EvalData, features: FeatureOptions, requested: FeatureKind | None,
            options: TrainOptions, image_size: int | None, run_dir: Path, context: DistContext,
            timer: StageTimer) -> tuple[dict[str, Any], list[str]]:
    source = requested or sweep_source_feature(entry.spec)
    variants = sweep_variants(entry.spec, requested)
    train, val = model_features(entry, eval_data, FeatureOptions(cache=features.cache, kind=source,
                                                                 batch_size=features.batch_size,
                                                                 num_workers=features.num_workers,
                                                                 device=features.device), timer)
    preset = linear_preset(entry)
    lrs = options.lrs or tuple(preset.lr * factor for factor in SWEEP_FACTORS)
    fit_pos, held_pos = heldout_split(train.labels, options.heldout_fraction, options.seed)
    settings, warnings = resolve_settings(preset, options, len(fit_pos))
    device = "cuda" if features.device != "cpu" and torch.cuda.is_available() else "cpu"
    with timer.stage("train"):
        sweep = train_head_sweep(train.features, train.labels, fit_pos, held_pos, spec=entry.spec, source=source,
                                 variants=variants, lrs=list(lrs),
                                 num_classes=eval_data.train.num_classes, data=eval_data.train.fingerprint,
                                 epochs=settings.epochs,
                                 batch_size=settings.batch_size, warmup_epochs=settings.warmup_epochs,
                                 seed=options.seed, checkpoint_path=run_dir / "checkpoint.pth", resume=options.resume,
                                 device=device, desc=f"{entry.key} heads")
    if context.is_main:  # after the sweep, which refuses a resume from another run before touching any file
        atomic.write_json(run_dir / "heldout.json", {"fraction": options.heldout_fraction, "seed": options.seed,
                                                     "indices": held_pos.tolist()})
    best = sweep.heads[sweep.winner]
    winner_kind = variants[best["variant"]]
    if len(lrs) > 2 and best["lr"] in (min(lrs), max(lrs)):
        warnings.append(f"{entry.key}: the chosen lr {best['lr']:g} is at the edge of the sweep "
                        f"({min(lrs):g}..{max(lrs):g}); widen it with --lr")
    with timer.stage("evaluate"):
        metrics = evaluate_head(sweep.weight, sweep.bias, val.features, val.labels,
                                variant_columns(entry.spec, source, winner_kind))
    head_path = run_dir / "head.pt"
    if context.is_main:
        save_head(head_path, (sweep.weight, sweep.bias), feature=winner_kind, spec=entry.spec,
                  classes=eval_data.train.classes, source=_source(entry, eval_data, "cached"))
    images = len(fit_pos) * settings.epochs - (sweep.resumed_from_epoch or 0) * len(fit_pos)
    protocol = {"mode": "cached", "feature": winner_kind.describe(), "cached_feature": source.describe(),
                "augmentation": "none (cached evaluation-transform features)", "eval_transform": eval_data.transform,
                "image_size": image_side(eval_data.spec, image_size),
                "epochs": settings.epochs, "batch_size": settings.batch_size, "warmup_epochs": settings.warmup_epochs,
                "lr_chosen": best["lr"], "scaled_lr": best["lr"] * settings.batch_size / 256, "heads": sweep.heads,
                "heldout": {"fraction": options.heldout_fraction, "images": len(held_pos),
                            "indices_file": str(run_dir / "heldout.json")},
                "features_from_cache": train.from_cache and val.from_cache, "train_seconds": round(sweep.seconds, 3),
                "images_per_second": round(images / sweep.seconds, 1) if sweep.seconds > 0 else None,
                "resumed_from_epoch": sweep.resumed_from_epoch, "history": sweep.history}
    return {"metrics": {"linear": metrics}, "protocol": protocol, "head": str(head_path)}, warnings


def _source(entry: LoadedBackbone, eval_data: EvalData, mode: str) -> dict[str, Any]:
    return {"checkpoint_sha256": entry.checkpoint.sha256, "model_key": entry.key, "dataset": eval_data.spec.text,
            "mode": mode}


def linear_table(payload: dict[str, Any]) -> str:
    """One row per model: mode, feature, chosen lr, top-1, top-5; in cached mode the sweep first."""
    parts = []
    for entry in payload["results"]:
        heads = entry["protocol"].get("heads")
        if heads:
            best = max(heads, key=lambda h: (h["heldout_top1"], h["heldout_top5"]))
            rows = [[h["feature"], f"{h['lr']:.4g}", f"{h['heldout_top1']:.2f}{'*' if h is best else ''}",
                     f"{h['heldout_top5']:.2f}"] for h in heads]
            parts.append(format_table(["feature", "lr", "held-out top1", "top5"], rows,
                                      title=f"{entry['key']}: head sweep on the held-out slice (* = chosen)"))
    rows = [[entry["key"], entry["arch"], entry["protocol"]["mode"], entry["protocol"]["feature"],
             f"{entry['protocol']['lr_chosen']:.4g}", entry["metrics"]["linear"]["top1"],
             entry["metrics"]["linear"]["top5"]] for entry in payload["results"]]
    parts.append(format_table(["model", "arch", "mode", "feature", "lr", "top1", "top5"], rows,
                              title=f"linear probe on {payload['dataset']['spec']} (val)"))
    return "\n\n".join(parts)
