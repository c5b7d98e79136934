"""`mokd-eval cifar`: fine-tuning transfer to CIFAR-10 / CIFAR-100 (paper A.4).

A.4 keeps A.3's settings (batch 1024, SGD, cosine, RandomResizedCrop + flip) with 100 epochs and 10 warm-up
epochs. Images are resized to the checkpoint's training crop size (else the backbone's pre-training resolution;
`--image-size` overrides). The data is torchvision's python pickles or `imagefolder:PATH` (PNG folders, e.g.
written by cifar2png), which take the same recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mokd.core.checkpoints import LoadedBackbone
from mokd.core.data import DataSpec, eval_transform, open_dataset, parse_data_spec, train_transform
from mokd.core.distributed import DistContext
from mokd.core.errors import MokdError
from mokd_eval.finetune import FitSettings
from mokd.core.pipeline import (Resolution, RunSettings, evaluation_resolution, load_models, model_record,
                                paper_resolution)
from mokd_eval.protocols import (AUGMENT_PADDED, AUGMENT_RESIZED, PAPER_PRECISION, Preset, TrainOptions,
                                 overall_verdict, paper_verdict, resolve_settings, run_root, train_with_search,
                                 training_record, verdict_line)
from mokd.core.results import StageTimer, build_results, format_table
from mokd_eval.semisup_eval import FINETUNE_BASE_LR, FINETUNE_BATCH, make_finetune_model
from mokd.core.validation import check_image_size

DATASETS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
# A.4: "the warming-up epoch is set to 10, and the training epoch is set to 100"; the rest as A.3.
CIFAR_EPOCHS, CIFAR_WARMUP = 100, 10
# A.4: "most settings keep the same with the experiments of semi-supervised learning": A.3's RandomResizedCrop
# + flip. The padded crop (resize, 1/8 reflect padding, random crop, flip) is the common CIFAR recipe, on request.
AUGMENTATIONS = {"resized": AUGMENT_RESIZED, "padded": AUGMENT_PADDED}
IMAGEFOLDER_PREFIX = "imagefolder:"


def cifar_reference(loaded: LoadedBackbone) -> dict[str, Any]:
    """A.4 for this model: A.3's batch and augmentation, 100 epochs with 10 warm-up, the training resolution,
    fp32; the lr is searched as in A.3, so any lr is."""
    return {"mode": "finetune", "epochs": CIFAR_EPOCHS, "warmup_epochs": CIFAR_WARMUP, "global_batch": FINETUNE_BATCH,
            "augmentation": AUGMENT_RESIZED, "image_size": paper_resolution(loaded), "precision": PAPER_PRECISION}


def cifar_protocol(entry: LoadedBackbone, settings: FitSettings, lr: float, selection: str, augment: str,
                   resolution: Resolution) -> dict[str, Any]:
    """One model's record, compared with A.4's (what a run records and `suite --plan` shows)."""
    record = training_record("cifar", "finetune", settings, lr_per_256=lr, selection=selection,
                             augmentation=AUGMENTATIONS[augment], feature="default", image_size=resolution.size,
                             image_size_from=resolution.source)
    return paper_verdict(record, cifar_reference(entry))


def cifar_spec_text(dataset: str, path: str | Path) -> str:
    """`--dataset cifar10 --data PATH` as a data spec; PATH may be the pickle folder itself or its parent, or
    `imagefolder:PATH` (train/ and val/ class folders of PNGs)."""
    if dataset not in DATASETS:
        raise MokdError(f"--dataset must be cifar10 or cifar100, not {dataset!r}")
    if str(path).startswith(IMAGEFOLDER_PREFIX):
        return str(path)
    folder = Path(path).expanduser().resolve()
    if folder.name == DATASETS[dataset]:
        folder = folder.parent
    if not folder.is_dir():
        raise MokdError(f"--data {path}: no such directory; give the folder holding {DATASETS[dataset]} "
                        "(the python version of the dataset; mokd never downloads data)")
    return f"{dataset}:{folder}"


def recipe_spec(spec: DataSpec, dataset: str) -> DataSpec:
    """The spec whose transforms a CIFAR run uses: PNG folders take the pickles' recipe (32 px images resized
    to the training size), not the ImageNet folders' resize-256 / centre-crop."""
    return parse_data_spec(f"{dataset}:{spec.path}") if spec.kind == "imagefolder" else spec


def cifar_resolution(loaded: list[LoadedBackbone], entry: LoadedBackbone, image_size: int | None) -> Resolution:
    """`--image-size`, else the checkpoint's training crop size, else the backbone's pre-training resolution."""
    resolution = evaluation_resolution(loaded, image_size)
    if resolution.size is not None:
        return resolution
    return Resolution(entry.spec.img_size, "the backbone's pre-training resolution")


def run_cifar(checkpoint: str | Path, run: RunSettings, *, dataset: str, options: TrainOptions, out: Path,
              context: DistContext, device: str = "auto", augment: str = "resized") -> dict[str, Any]:
    """Fine-tune each selected model on CIFAR and report top-1/top-5 on the test split; `augment` is
    "resized" (A.4's) or "padded"."""
    if augment not in AUGMENTATIONS:
        raise MokdError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, not {augment!r}")
    timer = StageTimer()
    with timer.stage("load"):
        spec = parse_data_spec(cifar_spec_text(dataset, run.data))
        train = open_dataset(spec, "train", skip_bad_images=run.skip_bad_images)
        val = open_dataset(spec, "val", skip_bad_images=run.skip_bad_images)
        run.echo(f"data: {spec.text} ({len(train)} train / {len(val)} test images, {train.num_classes} classes)")
        loaded = load_models(checkpoint, model=run.model, key=run.key, trust=run.trust, echo=run.echo)
        resolutions = {entry.key: cifar_resolution(loaded, entry, run.image_size) for entry in loaded}
        for entry in loaded:  # every model must take the resolution before any work
            check_image_size(resolutions[entry.key].size, entry.spec)
            run.echo(f"{entry.key}: {resolutions[entry.key].describe(spec)}")
    results, warnings = [], []
    root = run_root(out)
    recipe = recipe_spec(spec, dataset)
    for entry in loaded:
        resolution = resolutions[entry.key]
        size = resolution.size
        augmentation, augment_text = train_transform(recipe, size, crop=augment)
        evaluation, evaluation_text = eval_transform(recipe, size)
        family = "vit" if entry.spec.is_vit else "resnet"
        preset = Preset(CIFAR_EPOCHS, FINETUNE_BATCH, CIFAR_WARMUP, FINETUNE_BASE_LR[family])
        settings, notes = resolve_settings(preset, options, len(train))
        warnings.extend(notes)
        with timer.stage("train"):
            outcome = train_with_search(
                make_model=lambda entry=entry: make_finetune_model(entry, train.num_classes, options.seed),
                train_set=train.with_transform(augmentation), train_eval_set=train.with_transform(evaluation),
                labels=train.targets, val_set=val.with_transform(evaluation), settings=settings,
                lrs=options.lrs or (preset.lr,), options=options, run_dir=root / entry.key, context=context,
                desc=f"{entry.key} {dataset}",
                signature={"num_classes": train.num_classes, "image_size": size, "data": train.fingerprint},
                echo=run.echo)
        protocol = {"dataset": dataset, "train_transform": augment_text, "eval_transform": evaluation_text,
                    **outcome.protocol(), **cifar_protocol(entry, outcome.settings, outcome.lr, outcome.selection,
                                                           augment, resolution)}
        results.append({**model_record(entry), "metrics": {"cifar": outcome.metrics}, "protocol": protocol,
                        "run_dir": str(root / entry.key)})
    for message in dict.fromkeys(warnings):
        run.echo(f"warning: {message}")
    record = {"spec": spec.text, "train_images": len(train), "val_images": len(val), "num_classes": train.num_classes,
              "fingerprint": {"train": train.fingerprint, "val": val.fingerprint}}
    protocol = {"name": "cifar", "command": "cifar", "dataset": dataset, "mode": "finetune",
                "augmentation": AUGMENTATIONS[augment], "precision": options.precision,
                "selection": "held-out slice of the training set when several --lr are given",
                "optimizer": "SGD momentum 0.9, weight decay 0, lr x batch/256, linear warm-up then cosine",
                **overall_verdict([entry["protocol"] for entry in results])}
    config = {"checkpoint": str(checkpoint), "model": run.model, "key": run.key, "image_size": run.image_size,
              "device": device,
              "run_dir": str(root), "resume": options.resume}
    return build_results(command="cifar", protocol=protocol, dataset=record, results=results,
                         timings=timer.as_dict(), seed=options.seed, config=config)


def cifar_table(payload: dict[str, Any]) -> str:
    rows = [[entry["key"], entry["arch"], entry["protocol"]["image_size"], f"{entry['protocol']['lr_chosen']:.4g}",
             entry["protocol"]["epochs"], entry["metrics"]["cifar"]["top1"], entry["metrics"]["cifar"]["top5"]]
            for entry in payload["results"]]
    table = format_table(["model", "arch", "image size", "lr", "epochs", "top1", "top5"], rows,
                         title=f"{payload['protocol']['dataset']} fine-tuning (test split)")
    return f"{table}\n{verdict_line(payload['protocol'])}"
