"""Steps shared by the supervised protocols (linear probe in protocol mode, semi-supervised, CIFAR transfer).

Each trains one classifier per model through the one engine (`finetune.fit`). When several learning rates
are given, each is trained on the training data minus a seeded held-out slice and scored on that slice; the
best is then trained on all the training data and evaluated once on the validation set. The validation set
never takes part in a choice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from torch.utils.data import Dataset, Subset

from mokd_eval import atomic
from mokd_eval.distributed import DistContext
from mokd_eval.errors import MokdError
from mokd_eval.validation import POSITIVE, check_number
from mokd_eval.finetune import Classifier, FitResult, FitSettings, clamp_batch, evaluate, fit, settings_record
from mokd_eval.splits import heldout_split

HELDOUT_FRACTION = 0.1


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


@dataclass(frozen=True)
class Preset:
    """A protocol's defaults (the paper's supplement A.2-A.4)."""

    epochs: int
    batch_size: int
    warmup_epochs: int
    lr: float  # base lr per 256 images


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
    batch, warnings = clamp_batch(options.batch_size or preset.batch_size, train_size, "training")
    settings = FitSettings(epochs=epochs, batch_size=batch, lr=preset.lr, warmup_epochs=warmup,
                           accum_steps=options.accum_steps, max_batch_per_step=options.max_batch_per_step,
                           num_workers=options.num_workers, seed=options.seed)
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
    final_settings = replace(settings, lr=lr)
    model = make_model()
    final = fit(model, train_set, final_settings, run_dir=run_dir / "final", context=context, resume=options.resume,
                signature=signature, desc=desc)
    if after_fit is not None:
        after_fit(model)
    metrics = evaluate(model, val_set, batch_size=options.eval_batch_size, num_workers=options.num_workers,
                       context=context, desc=f"{desc} val")
    return Outcome(metrics, lr, search, final, final_settings, model)


def run_root(out: Path) -> Path:
    """Where a command keeps its per-model artefacts: next to the results JSON, named after it."""
    return out.with_suffix("")

