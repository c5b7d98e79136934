"""The paper's protocols, and the steps shared by the supervised ones (linear probe, semi-supervised, CIFAR).

Every results JSON records a `protocol` object: what was run (command, mode, epochs, lr per 256 and effective,
global batch, image size, augmentation, feature, split source, detector, precision) and whether that equals the
paper's protocol (`paper`, plus `differs`, the fields that do not). The references below are the MOKD
supplement's A.2-A.5; `report` places only `paper: true` results into the paper's table cells.

Each supervised protocol trains one classifier per model through the one engine (`finetune.fit`). When several
learning rates are given, each is trained on the training data minus a seeded held-out slice and scored on that
slice; the best is then trained on all the training data and evaluated once on the validation set. The
validation set never takes part in a choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from torch.utils.data import Dataset, Subset

from mokd.core import atomic
from mokd.core.distributed import DistContext
from mokd.core.errors import MokdError
from mokd.core.validation import POSITIVE, check_number
from mokd_eval.finetune import Classifier, FitResult, FitSettings, clamp_batch, evaluate, fit, settings_record
from mokd_eval.splits import heldout_split

HELDOUT_FRACTION = 0.1
# DINO's k-NN/linear extraction and MoCo's detectron2 configs run in fp32: so do we unless asked otherwise.
PAPER_PRECISION = "fp32"
# Short names of the training augmentations, as recorded in `protocol.augmentation`.
AUGMENT_RESIZED = "random-resized-crop+flip"  # A.2-A.4: RandomResizedCrop at the training resolution + flip
AUGMENT_PADDED = "padded-crop+flip"  # the common CIFAR recipe, not the paper's (A.4 keeps A.3's)
AUGMENT_NONE = "none (cached features)"


def paper_verdict(record: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """`record` plus `paper` (it equals `reference` on every field the reference names) and `differs`."""
    differs = sorted(name for name, expected in reference.items() if record.get(name) != expected)
    return {**record, "paper": not differs, "differs": differs}


def verdict_line(protocol: dict[str, Any]) -> str:
    """The line under a command's table saying whether its numbers are the paper's protocol."""
    if protocol.get("paper"):
        return "protocol: the paper's"
    return f"protocol: OFF the paper's (differs in {', '.join(protocol.get('differs') or ['unknown'])})"


def overall_verdict(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A payload's verdict from its models' protocols: the paper's only when every model's is."""
    differs = sorted({name for record in records for name in record.get("differs", [])})
    return {"paper": bool(records) and all(record.get("paper") for record in records), "differs": differs}


@dataclass
class TrainOptions:
    """What the user asked for; None means the protocol's preset."""

    epochs: int | None = None
    lrs: tuple[float, ...] | None = None
    batch_size: int | None = None
    warmup_epochs: int | None = None
    accum_steps: int | None = None
    max_batch_per_step: int | None = None
    eval_batch_size: int = 256
    num_workers: int | None = None
    resume: bool = False
    seed: int = 0
    heldout_fraction: float = HELDOUT_FRACTION
    precision: str = PAPER_PRECISION
    scale: str = "paper"  # "small": batches sized to the data (off-protocol where that changes them)
    tensorboard: bool = False


SCALES = ("paper", "small")
# `--scale small`: batches sized so that an epoch has at least this many optimizer steps (the paper's batch of
# 1,024-2,048 makes one step per epoch on a small dataset, and the numbers stay at chance).
SMALL_SCALE_STEPS_PER_EPOCH = 8


@dataclass(frozen=True)
class Preset:
    """A protocol's defaults (the paper's supplement A.2-A.4)."""

    epochs: int
    batch_size: int
    warmup_epochs: int
    lr: float  # base lr per 256 images


def scaled_batch(preset: Preset, options: TrainOptions, train_size: int) -> int:
    """The preset's batch, or with `scale="small"` one giving SMALL_SCALE_STEPS_PER_EPOCH steps per epoch."""
    if options.scale == "small":
        return max(1, min(preset.batch_size, math.ceil(train_size / SMALL_SCALE_STEPS_PER_EPOCH)))
    return preset.batch_size


def parse_lrs(text: str | None) -> tuple[float, ...] | None:
    """`--lr 0.1` or `--lr 0.01,0.03,0.1` (a search); None = the preset."""
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise MokdError(f"--lr takes numbers separated by commas (e.g. 0.01,0.03,0.1), not {text!r}") from None
    if not values:
        raise MokdError(f"--lr needs positive values, got {text!r}")
    return tuple(check_number(value, "--lr", POSITIVE) for value in values)


def resolve_settings(preset: Preset, options: TrainOptions, train_size: int) -> tuple[FitSettings, list[str]]:
    """The run's settings: preset < user options. A shorter `--epochs` scales the warm-up with it."""
    epochs = options.epochs if options.epochs is not None else preset.epochs
    if epochs < 1:
        raise MokdError("--epochs must be at least 1")
    if options.warmup_epochs is not None:
        warmup = options.warmup_epochs
        if not 0 <= warmup <= epochs:
            raise MokdError(f"--warmup-epochs {warmup} does not fit in {epochs} epochs")
    else:
        warmup = preset.warmup_epochs * epochs // preset.epochs if epochs < preset.epochs else preset.warmup_epochs
    batch, warnings = clamp_batch(options.batch_size or scaled_batch(preset, options, train_size), train_size,
                                  "training")
    settings = FitSettings(epochs=epochs, batch_size=batch, lr=preset.lr, warmup_epochs=warmup,
                           accum_steps=options.accum_steps, max_batch_per_step=options.max_batch_per_step,
                           num_workers=options.num_workers, seed=options.seed, precision=options.precision,
                           tensorboard=options.tensorboard)
    return settings, warnings


@dataclass
class Outcome:
    """One model's result: validation metrics, the chosen lr, the search table and the final run."""

    metrics: dict[str, float]
    lr: float
    search: list[dict[str, Any]]
    final: FitResult
    settings: FitSettings
    model: Classifier
    selection: str  # "fixed" (one lr) or how the search scored the lrs

    def protocol(self) -> dict[str, Any]:
        return {**settings_record(self.settings, self.final), "lr_chosen": self.lr, "lr_search": self.search,
                "images_per_second": round(self.final.images_per_second, 1), "train_seconds":
                round(self.final.seconds, 3), "resumed_from_epoch": self.final.resumed_from_epoch,
                "history": self.final.history}


def train_with_search(*, make_model: Callable[[], Classifier], train_set: Dataset, train_eval_set: Dataset,
                      labels: np.ndarray, val_set: Dataset, settings: FitSettings, lrs: Sequence[float],
                      options: TrainOptions, run_dir: Path, context: DistContext, signature: dict[str, Any],
                      desc: str, after_fit: Callable[[Classifier], None] | None = None,
                      echo: Callable[[str], None] = print) -> Outcome:
    """Search `lrs` on a held-out slice of `train_set` (when there are several), train the winner on all of it,
    evaluate on `val_set` once. `train_eval_set` holds the same items as `train_set` with the evaluation
    transform; `labels` are their labels. `after_fit(model)` runs after every training (backbone checks)."""
    search: list[dict[str, Any]] = []
    if len(lrs) > 1:
        fit_pos, held_pos = heldout_split(labels, options.heldout_fraction, options.seed)
        for lr in lrs:
            model = make_model()
            run_settings = replace(settings, lr=lr, batch_size=min(settings.batch_size, len(fit_pos)))
            fit(model, Subset(train_set, fit_pos.tolist()), run_settings, run_dir=run_dir / f"search-lr{lr:g}",
                context=context, resume=options.resume, signature=signature, desc=f"{desc} lr {lr:g}")
            if after_fit is not None:
                after_fit(model)
            scores = evaluate(model, Subset(train_eval_set, held_pos.tolist()), batch_size=options.eval_batch_size,
                              num_workers=options.num_workers, context=context, desc=f"{desc} held-out")
            search.append({"lr": lr, "heldout_top1": scores["top1"], "heldout_top5": scores["top5"]})
            echo(f"  {desc}: lr {lr:g} -> held-out top-1 {scores['top1']:.2f}")
        if context.is_main:  # after the fits, which refuse a resume from another run before touching any file
            atomic.write_json(run_dir / "heldout.json", {"fraction": options.heldout_fraction, "seed": options.seed,
                                                         "positions": held_pos.tolist()})
        best = max(search, key=lambda row: (row["heldout_top1"], row["heldout_top5"]))
        lr = best["lr"]
    else:
        lr = lrs[0]
    selection = selection_text(lrs, options)
    final_settings = replace(settings, lr=lr)
    model = make_model()
    final = fit(model, train_set, final_settings, run_dir=run_dir / "final", context=context, resume=options.resume,
                signature=signature, desc=desc)
    if after_fit is not None:
        after_fit(model)
    metrics = evaluate(model, val_set, batch_size=options.eval_batch_size, num_workers=options.num_workers,
                       context=context, desc=f"{desc} val")
    return Outcome(metrics, lr, search, final, final_settings, model, selection)


def selection_text(lrs: Sequence[float], options: TrainOptions) -> str:
    """How the lr of a run is chosen: fixed, or scored on a held-out slice of the training set."""
    return "fixed" if len(lrs) == 1 else f"held-out {options.heldout_fraction:.0%} of the training set"


def training_record(command: str, mode: str, settings: FitSettings, *, lr_per_256: float, selection: str,
                    augmentation: str, feature: str, image_size: int, image_size_from: str) -> dict[str, Any]:
    """The fields a supervised run is compared on: the lr per 256 images and the effective lr at the global batch
    actually used, schedule, augmentation, feature, resolution, precision, how the lr was chosen. A run and
    `suite --plan` build it from the same resolved settings."""
    return {"command": command, "mode": mode, "epochs": settings.epochs, "warmup_epochs": settings.warmup_epochs,
            "global_batch": settings.batch_size, "lr_per_256": lr_per_256,
            "lr": lr_per_256 * settings.batch_size / 256, "weight_decay": settings.weight_decay,
            "augmentation": augmentation, "feature": feature, "image_size": image_size,
            "image_size_from": image_size_from, "precision": settings.precision, "lr_selection": selection}


def run_root(out: Path) -> Path:
    """Where a command keeps its per-model artefacts: next to the results JSON, named after it."""
    return out.with_suffix("")

