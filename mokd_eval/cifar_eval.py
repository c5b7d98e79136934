"""`mokd-eval cifar`: fine-tuning transfer to CIFAR-10 / CIFAR-100 (paper A.4).

A.4 keeps A.3's settings (batch 1024, SGD, cosine) with 100 epochs and 10 warm-up epochs. Images are resized
to the backbone's pre-training resolution (`--image-size` overrides) and trained with random crop + flip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from mokd_eval.data import eval_transform, open_dataset, parse_data_spec, train_transform
from mokd_eval.distributed import DistContext
from mokd_eval.errors import MokdError
from mokd_eval.pipeline import load_models, model_record
from mokd_eval.protocols import Preset, TrainOptions, resolve_settings, run_root, train_with_search
from mokd_eval.results import StageTimer, build_results, format_table
from mokd_eval.semisup_eval import FINETUNE_BASE_LR, FINETUNE_BATCH, make_finetune_model
from mokd_eval.validation import check_image_size

DATASETS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_EPOCHS, CIFAR_WARMUP = 100, 10


def cifar_spec_text(dataset: str, path: str | Path) -> str:
    """`--dataset cifar10 --data PATH` as a data spec; PATH may be the pickle folder itself or its parent."""
    if dataset not in DATASETS:
        raise MokdError(f"--dataset must be cifar10 or cifar100, not {dataset!r}")
    folder = Path(path).expanduser().resolve()
    if folder.name == DATASETS[dataset]:
        folder = folder.parent
    if not folder.is_dir():
        raise MokdError(f"--data {path}: no such directory; give the folder holding {DATASETS[dataset]} "
                        "(the python version of the dataset; mokd never downloads data)")
    return f"{dataset}:{folder}"


def run_cifar(checkpoint: str | Path, *, dataset: str, data: str | Path, options: TrainOptions, out: Path,
              context: DistContext, device: str = "auto", model: str | None = None, key: str | None = None,
              trust: bool = False, image_size: int | None = None,
              echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune each selected model on CIFAR and report top-1/top-5 on the test split."""
    timer = StageTimer()
    with timer.stage("load"):
        spec = parse_data_spec(cifar_spec_text(dataset, data))
        train = open_dataset(spec, "train")
        val = open_dataset(spec, "val")
        echo(f"data: {spec.text} ({len(train)} train / {len(val)} test images, {train.num_classes} classes)")
        loaded = load_models(checkpoint, model=model, key=key, trust=trust, echo=echo)
        for entry in loaded:  # every model must take the resolution before any work
            check_image_size(image_size or entry.spec.img_size, entry.spec)
    results, warnings = [], []
    root = run_root(out)
    for entry in loaded:
        size = image_size or entry.spec.img_size
        augment, augment_text = train_transform(spec, size, crop="padded")
        evaluation, evaluation_text = eval_transform(spec, size)
        family = "vit" if entry.spec.is_vit else "resnet"
        preset = Preset(CIFAR_EPOCHS, FINETUNE_BATCH, CIFAR_WARMUP, FINETUNE_BASE_LR[family])
        settings, notes = resolve_settings(preset, options, len(train))
        warnings.extend(notes)
        with timer.stage("train"):
            outcome = train_with_search(
                make_model=lambda entry=entry: make_finetune_model(entry, train.num_classes, options.seed),
                train_set=train.with_transform(augment), train_eval_set=train.with_transform(evaluation),
                labels=train.targets, val_set=val.with_transform(evaluation), settings=settings,
                lrs=options.lrs or (preset.lr,), options=options, run_dir=root / entry.key, context=context,
                desc=f"{entry.key} {dataset}",
                signature={"num_classes": train.num_classes, "image_size": size, "data": train.fingerprint},
                echo=echo)
        protocol = {"mode": "finetune", "dataset": dataset, "image_size": size, "train_transform": augment_text,
                    "eval_transform": evaluation_text, **outcome.protocol()}
        results.append({**model_record(entry), "metrics": {"cifar": outcome.metrics}, "protocol": protocol,
                        "run_dir": str(root / entry.key)})
    for message in dict.fromkeys(warnings):
        echo(f"warning: {message}")
    record = {"spec": spec.text, "train_images": len(train), "val_images": len(val), "num_classes": train.num_classes,
              "fingerprint": {"train": train.fingerprint, "val": val.fingerprint}}
    protocol = {"name": "cifar", "dataset": dataset, "mode": "finetune",
                "selection": "held-out slice of the training set when several --lr are given",
                "optimizer": "SGD momentum 0.9, weight decay 0, lr x batch/256, linear warm-up then cosine"}
    config = {"checkpoint": str(checkpoint), "model": model, "key": key, "image_size": image_size, "device": device,
              "run_dir": str(root), "resume": options.resume}
    return build_results(command="cifar", protocol=protocol, dataset=record, results=results,
                         timings=timer.as_dict(), seed=options.seed, config=config)


def cifar_table(payload: dict[str, Any]) -> str:
    rows = [[entry["key"], entry["arch"], entry["protocol"]["image_size"], f"{entry['protocol']['lr_chosen']:.4g}",
             entry["protocol"]["epochs"], entry["metrics"]["cifar"]["top1"], entry["metrics"]["cifar"]["top5"]]
            for entry in payload["results"]]
    return format_table(["model", "arch", "image size", "lr", "epochs", "top1", "top5"], rows,
                        title=f"{payload['protocol']['dataset']} fine-tuning (test split)")
