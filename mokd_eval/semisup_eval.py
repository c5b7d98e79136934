"""`mokd-eval semisup`: semi-supervised evaluation on a 1% / 10% labelled subset (paper A.3).

`finetune` (the paper's protocol): the whole network fine-tuned on the subset. `linear`: a frozen linear probe
on the subset, the variant some papers report under the same name; every output says which one it is.
The subset is SimCLR's split file when given, else a seeded class-stratified subset saved for reuse.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from mokd.core.checkpoints import LoadedBackbone, file_sha256
from mokd.core.data import train_transform
from mokd.core.distributed import DistContext
from mokd.core.errors import MokdError
from mokd.core.features import FeatureKind
from mokd_eval.finetune import Classifier, FitSettings
from mokd_eval.linear import LINEAR_BASE_LR, protocol_feature, snapshot, verify_unchanged
from mokd.core.pipeline import Resolution, RunSettings, load_models, model_record, open_data_for, paper_resolution
from mokd_eval.protocols import (AUGMENT_RESIZED, PAPER_PRECISION, Preset, TrainOptions, overall_verdict,
                                 paper_verdict, resolve_settings, run_root, train_with_search, training_record,
                                 verdict_line)
from mokd.core.results import StageTimer, build_results, format_table
from mokd_eval.splits import ALLOWED_PERCENTS, read_split_file, stratified_subset, write_split_file

MODES = ("finetune", "linear")
# A.3: "fine-tuned with 1024 batch size for 60 epochs and 30 epochs on 1% and 10% subsets", "warmed up [...]
# during the first 5 epochs", SGD, cosine; "the best base learning rate is searched for each model", so our
# default base lrs (per 256 images) are a starting point; give --lr a comma list to search.
FINETUNE_BASE_LR = {"resnet": 0.05, "vit": 0.01}
FINETUNE_BATCH, FINETUNE_WARMUP = 1024, 5
EPOCHS_BY_PERCENT = {1: 60, 10: 30}


def semisup_reference(loaded: LoadedBackbone, percent: float) -> dict[str, Any]:
    """A.3 for this model: the whole network fine-tuned on SimCLR's 1% / 10% list (a split file), the preset's
    schedule and batch, augmented images at the training resolution, fp32. The lr is searched, so any lr is."""
    return {"mode": "finetune", "percent": percent if percent in ALLOWED_PERCENTS else "1 or 10",
            "split_kind": "file", "epochs": EPOCHS_BY_PERCENT.get(percent, "60 (1%) or 30 (10%)"),
            "warmup_epochs": FINETUNE_WARMUP, "global_batch": FINETUNE_BATCH, "augmentation": AUGMENT_RESIZED,
            "image_size": paper_resolution(loaded), "precision": PAPER_PRECISION}


def semisup_protocol(entry: LoadedBackbone, mode: str, settings: FitSettings, lr: float, selection: str,
                     kind: FeatureKind, side: int, resolution: Resolution, percent: float, split_kind: str,
                     split_described: str) -> dict[str, Any]:
    """One model's record, compared with A.3's (what a run records and `suite --plan` shows)."""
    record = {**training_record("semisup", mode, settings, lr_per_256=lr, selection=selection,
                                augmentation=AUGMENT_RESIZED, feature=kind.describe(), image_size=side,
                                image_size_from=resolution.source),
              "percent": percent, "split_kind": split_kind, "split_source": split_described}
    return paper_verdict(record, semisup_reference(entry, percent))


def split_source(split_path: Path, sha256: str, source: str, seed: int) -> str:
    """Where the labelled subset came from, in words: the file's name and hash, or the seeded draw."""
    return f"file {split_path.name} (sha256 {sha256})" if source == "file" else f"stratified, seed {seed}"


def finetune_preset(loaded: LoadedBackbone, epochs: int, warmup: int) -> Preset:
    family = "vit" if loaded.spec.is_vit else "resnet"
    return Preset(epochs=epochs, batch_size=FINETUNE_BATCH, warmup_epochs=warmup, lr=FINETUNE_BASE_LR[family])


def make_finetune_model(entry: LoadedBackbone, num_classes: int, seed: int) -> Classifier:
    """A fresh copy of the pre-trained backbone with a new head, all of it trainable."""
    torch.manual_seed(seed)
    return Classifier(copy.deepcopy(entry.module), entry.spec, FeatureKind(), num_classes, frozen=False)


def run_semisup(checkpoint: str | Path, run: RunSettings, *, percent: float, split_file: Path | None, mode: str,
                options: TrainOptions, out: Path, context: DistContext, device: str = "auto") -> dict[str, Any]:
    """Fine-tune (or linear-probe) each selected model on the labelled subset; returns the results payload."""
    if mode not in MODES:
        raise MokdError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    if split_file is None and percent not in ALLOWED_PERCENTS:
        raise MokdError(f"--percent must be 1 or 10 for a generated subset (got {percent:g}); "
                        "other fractions need a --split-file")
    if not 0 < percent <= 100:
        raise MokdError(f"--percent must be in (0, 100], got {percent:g}")
    timer = StageTimer()
    with timer.stage("load"):
        loaded = load_models(checkpoint, model=run.model, key=run.key, trust=run.trust, echo=run.echo)
        eval_data, resolution = open_data_for(loaded, run, check_side=True)
        train = eval_data.train
        names = [train.item_name(index) for index in range(len(train))]
        if split_file is not None:
            indices = read_split_file(split_file, names, percent=percent)
            split_path, split_kind = Path(split_file), "file"
        else:
            indices = stratified_subset(train.targets, percent, options.seed, train.num_classes)
            split_path = out.parent / f"{out.stem}.split-{percent:g}pct-seed{options.seed}.txt"
            if context.is_main:
                write_split_file(split_path, names, indices)
            split_kind = "stratified"
        run.echo(f"data: {eval_data.spec.text}: {len(indices)} labelled of {len(train)} train images ({percent:g}%, "
                 f"{'split file ' + str(split_path) if split_kind == 'file' else 'seeded stratified subset'}), "
                 f"{len(eval_data.val)} val images, {train.num_classes} classes")
    context.barrier()
    sha256 = file_sha256(split_path)
    split = {"source": split_kind, "file": str(split_path), "sha256": sha256, "images": int(len(indices)),
             "percent": percent, "seed": options.seed if split_kind != "file" else None,
             "described": split_source(split_path, sha256, split_kind, options.seed)}
    augment, augment_text = train_transform(eval_data.spec, resolution.size)
    labelled = Subset(train.with_transform(augment), indices.tolist())
    labelled_eval = Subset(train, indices.tolist())
    labels = train.targets[indices]
    epochs_default = EPOCHS_BY_PERCENT.get(int(percent) if float(percent).is_integer() else -1, 30)

    results, warnings = [], []
    root = run_root(out)
    for entry in loaded:
        preset = finetune_preset(entry, epochs_default, FINETUNE_WARMUP)
        if mode == "linear":
            preset = Preset(preset.epochs, preset.batch_size, preset.warmup_epochs,
                            LINEAR_BASE_LR["vit" if entry.spec.is_vit else "resnet"])
        settings, notes = resolve_settings(preset, options, len(indices))
        warnings.extend(notes)
        kind = protocol_feature(entry.spec) if mode == "linear" else FeatureKind()
        after_fit = None
        if mode == "linear":
            before = snapshot(entry.module)
            what = f"{entry.checkpoint.path} '{entry.key}'"

            def make_model(entry: LoadedBackbone = entry, kind: FeatureKind = kind) -> Classifier:
                torch.manual_seed(options.seed)
                return Classifier(entry.module, entry.spec, kind, train.num_classes, frozen=True)

            def after_fit(model: Classifier, before: dict = before, what: str = what) -> None:
                verify_unchanged(model.backbone, before, what)
        else:
            def make_model(entry: LoadedBackbone = entry) -> Classifier:
                return make_finetune_model(entry, train.num_classes, options.seed)
        with timer.stage("train"):
            outcome = train_with_search(
                make_model=make_model, train_set=labelled, train_eval_set=labelled_eval, labels=labels,
                val_set=eval_data.val, settings=settings, lrs=options.lrs or (preset.lr,), options=options,
                run_dir=root / entry.key, context=context, desc=f"{entry.key} {mode}",
                signature={"num_classes": train.num_classes, "mode": mode, "split_sha256": split["sha256"],
                           "data": train.fingerprint},
                after_fit=after_fit, echo=run.echo)
        protocol = {"label": _mode_label(mode), "split": split, "train_transform": augment_text,
                    "eval_transform": eval_data.transform, **outcome.protocol(),
                    **semisup_protocol(entry, mode, outcome.settings, outcome.lr, outcome.selection, kind,
                                       eval_data.side, resolution, percent, split_kind, split["described"])}
        results.append({**model_record(entry), "metrics": {"semisup": outcome.metrics}, "protocol": protocol,
                        "run_dir": str(root / entry.key)})
    for message in dict.fromkeys(warnings):
        run.echo(f"warning: {message}")
    protocol = {"name": "semisup", "mode": mode, "label": _mode_label(mode), "percent": percent, "split": split,
                "selection": "held-out slice of the labelled subset when several --lr are given",
                "optimizer": "SGD momentum 0.9, weight decay 0, lr x batch/256, linear warm-up then cosine",
                "command": "semisup", "split_source": split["described"], "precision": options.precision,
                **overall_verdict([entry["protocol"] for entry in results])}
    config = {"checkpoint": str(checkpoint), "model": run.model, "key": run.key, "image_size": run.image_size,
              "device": device,
              "run_dir": str(root), "resume": options.resume, "split_file": str(split_file) if split_file else None}
    return build_results(command="semisup", protocol=protocol, dataset=eval_data.record(), results=results,
                         timings=timer.as_dict(), seed=options.seed, config=config)


def _mode_label(mode: str) -> str:
    return "full fine-tuning" if mode == "finetune" else "frozen linear probe (not the paper's fine-tuning protocol)"


def semisup_table(payload: dict[str, Any]) -> str:
    protocol = payload["protocol"]
    rows = [[entry["key"], entry["arch"], f"{entry['protocol']['lr_chosen']:.4g}", entry["protocol"]["epochs"],
             entry["metrics"]["semisup"]["top1"], entry["metrics"]["semisup"]["top5"]] for entry in payload["results"]]
    title = (f"semi-supervised, {protocol['percent']:g}% labels ({protocol['split']['source']} split, "
             f"{protocol['split']['images']} images), {protocol['label']}, on {payload['dataset']['spec']} (val)")
    table = format_table(["model", "arch", "lr", "epochs", "top1", "top5"], rows, title=title)
    return f"{table}\n{verdict_line(protocol)}"

