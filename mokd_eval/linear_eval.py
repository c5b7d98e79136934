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

from mokd.core import atomic
from mokd.core.checkpoints import LoadedBackbone
from mokd.core.data import train_transform
from mokd.core.distributed import DistContext
from mokd.core.errors import MokdError
from mokd.core.features import FeatureKind
from mokd_eval.finetune import Classifier, FitSettings
from mokd_eval.linear import (LINEAR_BASE_LR, SWEEP_FACTORS, cross_validated_sweep, evaluate_head, protocol_feature,
                              save_head, snapshot, sweep_source_feature, sweep_variants, train_head_sweep,
                              variant_columns, verify_unchanged)
from mokd.core.pipeline import (EvalData, FeatureOptions, Resolution, RunSettings, load_models, model_features,
                                model_record, open_data_for, paper_resolution)
from mokd_eval.protocols import (AUGMENT_NONE, AUGMENT_RESIZED, PAPER_PRECISION, Preset, TrainOptions,
                                 overall_verdict, paper_verdict, resolve_settings, run_root, train_with_search,
                                 training_record, verdict_line)
from mokd.core.results import StageTimer, build_results, format_table
from mokd_eval.splits import heldout_split, kfold_split

MODES = ("protocol", "cached")
# Below this many training images the cached probe scores its heads by k-fold cross-validation: a 10 % slice of
# 100 images is 10 images, and the choice it makes is noise (measured: held-out scores 30-50 % for every lr).
CROSS_VALIDATE_BELOW = 2000
CROSS_VALIDATION_FOLDS = 5
# A.2: "SGD [...] batch size of 2048 for 100 epochs [...] linearly warmed up [...] during the first 10 epochs".
LINEAR_EPOCHS, LINEAR_BATCH, LINEAR_WARMUP = 100, 2048, 10


def linear_preset(loaded: LoadedBackbone) -> Preset:
    family = "vit" if loaded.spec.is_vit else "resnet"
    return Preset(epochs=LINEAR_EPOCHS, batch_size=LINEAR_BATCH, warmup_epochs=LINEAR_WARMUP, lr=LINEAR_BASE_LR[family])


def linear_reference(loaded: LoadedBackbone) -> dict[str, Any]:
    """A.2's linear probe for this model: the preset at one fixed lr (0.08 / 0.008 at batch 2,048), no weight
    decay, augmented images at the training resolution, DINO's feature, fp32."""
    preset = linear_preset(loaded)
    return {"mode": "protocol", "epochs": preset.epochs, "warmup_epochs": preset.warmup_epochs,
            "global_batch": preset.batch_size, "lr_per_256": preset.lr, "lr": preset.lr * preset.batch_size / 256,
            "weight_decay": 0.0, "augmentation": AUGMENT_RESIZED, "feature": protocol_feature(loaded.spec).describe(),
            "image_size": paper_resolution(loaded), "precision": PAPER_PRECISION, "lr_selection": "fixed"}


def linear_protocol(entry: LoadedBackbone, settings: FitSettings, lr: float, selection: str, kind: FeatureKind,
                    side: int, resolution: Resolution) -> dict[str, Any]:
    """One model's protocol-mode record, compared with A.2's (what a run records and `suite --plan` shows)."""
    record = training_record("linear", "protocol", settings, lr_per_256=lr, selection=selection,
                             augmentation=AUGMENT_RESIZED, feature=kind.describe(), image_size=side,
                             image_size_from=resolution.source)
    return paper_verdict(record, linear_reference(entry))


def run_linear(checkpoint: str | Path, run: RunSettings, *, mode: str, features: FeatureOptions,
               feature_given: bool, options: TrainOptions, out: Path, context: DistContext) -> dict[str, Any]:
    """Linear-probe each selected model of `checkpoint`; returns the results payload (not yet written)."""
    if mode not in MODES:
        raise MokdError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    timer = StageTimer()
    with timer.stage("load"):
        loaded = load_models(checkpoint, model=run.model, key=run.key, trust=run.trust, echo=run.echo)
        eval_data, resolution = open_data_for(loaded, run, data_line=EvalData.summary, check_side=True)
    root = run_root(out)
    results, warnings = [], []
    for entry in loaded:
        requested = features.kind if feature_given else None
        if mode == "cached":
            record, notes = _cached(entry, eval_data, features, requested, options, resolution, root / entry.key,
                                    context, timer)
        else:
            record, notes = _protocol(entry, eval_data, requested, options, resolution, root / entry.key, context,
                                      timer, run.echo)
        warnings.extend(notes)
        results.append({**model_record(entry), **record})
    for message in dict.fromkeys(warnings):
        run.echo(f"warning: {message}")
    protocol = {"name": "linear", "mode": mode, "classifier": "Linear, N(0, 0.01) weights, zero bias, no BN",
                "optimizer": "SGD momentum 0.9, weight decay 0, lr x batch/256, linear warm-up then cosine",
                "selection": ("held-out slice of the training set" if mode == "cached"
                              else "held-out slice of the training set when several --lr are given"),
                "num_classes_from": "train split", "precision": options.precision,
                **overall_verdict([entry["protocol"] for entry in results])}
    config = {"checkpoint": str(checkpoint), "model": run.model, "key": run.key, "image_size": run.image_size,
              "device": features.device, "run_dir": str(root), "resume": options.resume,
              "cache_dir": str(features.cache.root) if features.cache.root else None}
    return build_results(command="linear", protocol=protocol, dataset=eval_data.record(), results=results,
                         timings=timer.as_dict(), seed=options.seed, config=config)


def _protocol(entry: LoadedBackbone, eval_data: EvalData, requested: FeatureKind | None, options: TrainOptions,
              resolution: Resolution, run_dir: Path, context: DistContext, timer: StageTimer,
              echo: Callable[[str], None]) -> tuple[dict[str, Any], list[str]]:
    kind = requested or protocol_feature(entry.spec)
    preset = linear_preset(entry)
    settings, warnings = resolve_settings(preset, options, len(eval_data.train))
    augment, augment_text = train_transform(eval_data.spec, resolution.size)
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
    protocol = {"train_transform": augment_text, "eval_transform": eval_data.transform, "backbone_unchanged": True,
                **outcome.protocol(), **linear_protocol(entry, outcome.settings, outcome.lr, outcome.selection, kind,
                                                        eval_data.side, resolution)}
    return {"metrics": {"linear": outcome.metrics}, "protocol": protocol, "head": str(head_path)}, warnings


def _cached(entry: LoadedBackbone, eval_data: EvalData, features: FeatureOptions, requested: FeatureKind | None,
            options: TrainOptions, resolution: Resolution, run_dir: Path, context: DistContext,
            timer: StageTimer) -> tuple[dict[str, Any], list[str]]:
    source = requested or sweep_source_feature(entry.spec)
    variants = sweep_variants(entry.spec, requested)
    train, val = model_features(entry, eval_data, FeatureOptions(cache=features.cache, kind=source,
                                                                 batch_size=features.batch_size,
                                                                 num_workers=features.num_workers,
                                                                 device=features.device,
                                                                 precision=features.precision), timer)
    preset = linear_preset(entry)
    lrs = options.lrs or tuple(preset.lr * factor for factor in SWEEP_FACTORS)
    device = "cuda" if features.device != "cpu" and torch.cuda.is_available() else "cpu"
    images = len(train.labels)
    if images < CROSS_VALIDATE_BELOW:
        folds = kfold_split(train.labels, CROSS_VALIDATION_FOLDS, options.seed)
        settings, warnings = resolve_settings(preset, options, images - max(len(fold) for fold in folds))
        selection = f"{CROSS_VALIDATION_FOLDS}-fold cross-validation on the training set"
        heldout = {"folds": CROSS_VALIDATION_FOLDS, "images": images, "indices_file": str(run_dir / "folds.json")}
        indices = {"seed": options.seed, "folds": [f.tolist() for f in folds]}
        trained_images = images * CROSS_VALIDATION_FOLDS  # k fits on (k-1)/k of the rows, then one on all
    else:
        fit_pos, held_pos = heldout_split(train.labels, options.heldout_fraction, options.seed)
        settings, warnings = resolve_settings(preset, options, len(fit_pos))
        selection = f"held-out {options.heldout_fraction:.0%} of the training set"
        heldout = {"fraction": options.heldout_fraction, "images": len(held_pos),
                   "indices_file": str(run_dir / "heldout.json")}
        indices = {"fraction": options.heldout_fraction, "seed": options.seed, "indices": held_pos.tolist()}
        trained_images = len(fit_pos)
    common = {"spec": entry.spec, "source": source, "num_classes": eval_data.train.num_classes,
              "epochs": settings.epochs, "batch_size": settings.batch_size, "warmup_epochs": settings.warmup_epochs,
              "seed": options.seed, "resume": options.resume, "device": device, "tensorboard": options.tensorboard,
              "data": eval_data.train.fingerprint}
    with timer.stage("train"):
        if images < CROSS_VALIDATE_BELOW:
            sweep = cross_validated_sweep(train.features, train.labels, folds, variants=variants, lrs=list(lrs),
                                          checkpoint_dir=run_dir, desc=f"{entry.key} heads", **common)
        else:
            sweep = train_head_sweep(train.features, train.labels, fit_pos, held_pos, variants=variants,
                                     lrs=list(lrs), checkpoint_path=run_dir / "checkpoint.pth",
                                     desc=f"{entry.key} heads", **common)
    if context.is_main:  # after the sweep, which refuses a resume from another run before touching any file
        atomic.write_json(Path(heldout["indices_file"]), indices)
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
    trained = trained_images * (settings.epochs - (sweep.resumed_from_epoch or 0))
    record = {"command": "linear", "mode": "cached", "epochs": settings.epochs,
              "warmup_epochs": settings.warmup_epochs, "global_batch": settings.batch_size, "lr_per_256": best["lr"],
              "lr": best["lr"] * settings.batch_size / 256, "weight_decay": 0.0, "augmentation": AUGMENT_NONE,
              "feature": winner_kind.describe(), "image_size": eval_data.side,
              "image_size_from": resolution.source, "precision": features.precision,
              "lr_selection": selection}
    protocol = {**paper_verdict(record, linear_reference(entry)), "cached_feature": source.describe(),
                "eval_transform": eval_data.transform, "batch_size": settings.batch_size,
                "lr_chosen": best["lr"], "scaled_lr": best["lr"] * settings.batch_size / 256, "heads": sweep.heads,
                "heldout": heldout,
                "features_from_cache": train.from_cache and val.from_cache, "train_seconds": round(sweep.seconds, 3),
                "images_per_second": round(trained / sweep.seconds, 1) if sweep.seconds > 0 else None,
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
                                      title=f"{entry['key']}: head sweep scored by {entry['protocol']['lr_selection']}"
                                            " (* = chosen)"))
    rows = [[entry["key"], entry["arch"], entry["protocol"]["mode"], entry["protocol"]["feature"],
             f"{entry['protocol']['lr_chosen']:.4g}", entry["metrics"]["linear"]["top1"],
             entry["metrics"]["linear"]["top5"]] for entry in payload["results"]]
    parts.append(format_table(["model", "arch", "mode", "feature", "lr", "top1", "top5"], rows,
                              title=f"linear probe on {payload['dataset']['spec']} (val)"))
    return "\n\n".join(parts) + f"\n{verdict_line(payload['protocol'])}"
