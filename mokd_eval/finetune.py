"""The one supervised training engine: linear probe (protocol mode), semi-supervised and CIFAR fine-tuning.

One loop for every image-level training the protocols need: SGD with momentum, linear warm-up then cosine
(per iteration), lr scaled by batch/256, fp32 (bf16 / fp16 autocast on CUDA when asked), DDP under `torchrun`
(one process without it), gradient accumulation when the batch does not fit, a checkpoint per epoch and exact
resume (weights, optimizer, scaler, RNG, epoch), tqdm with loss/accuracy/images per second, and a per-epoch
JSON-lines log.

Accumulated micro-batches are weighted by their share of the optimizer-step batch, so a run with
`accum_steps=k` computes the same gradient as one big batch.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm.auto import tqdm

from mokd.core import atomic
from mokd.core.checkpoints import load_resume_state
from mokd.core.distributed import DistContext
from mokd.core.errors import MokdError
from mokd.core.features import FeatureKind, feature_function
from mokd.core.registry import ArchSpec
from mokd.core.resources import apply_resources
from mokd.core.schedules import cosine_schedule
from mokd.core.tensorboard_log import TensorBoardLog
from mokd.core.training_loop import (autocast_for, capture_rng, optimizer_step, restore_optimization, restore_rng,
                                     scale_loss, scaler_state)

CHECKPOINT_NAME = "checkpoint.pth"
LOG_NAME = "log.jsonl"


def linear_head(in_dim: int, num_classes: int) -> nn.Linear:
    """A plain Linear classifier, weights N(0, 0.01) and zero bias (DINO's / MoCo's linear probe init)."""
    head = nn.Linear(in_dim, num_classes)
    nn.init.normal_(head.weight, mean=0.0, std=0.01)
    nn.init.zeros_(head.bias)
    return head


class Classifier(nn.Module):
    """A backbone's feature (of `kind`) followed by a linear head.

    `frozen=True` is the linear probe: the backbone stays in eval mode (BatchNorm statistics untouched),
    without gradients, whatever `train()` is called with.
    """

    def __init__(self, backbone: nn.Module, spec: ArchSpec, kind: FeatureKind, num_classes: int, *,
                 frozen: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.frozen = frozen
        self.channels_last = not spec.is_vit  # faster convolutions on CPU and GPU, as in the feature extractor
        self.head = linear_head(kind.dim(spec), num_classes)
        self._features = feature_function(backbone, spec, kind)
        if frozen:
            backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                features = self._features(images)
            return self.head(features.float())
        return self.head(self._features(images))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold: the head alone for a frozen probe, everything when fine-tuning."""
        return self.head.state_dict() if self.frozen else self.state_dict()

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        (self.head if self.frozen else self).load_state_dict(state, strict=True)


@dataclass
class FitSettings:
    """How to train: `batch_size` is the global batch of one optimizer step; `lr` is per 256 images."""

    epochs: int
    batch_size: int
    lr: float
    warmup_epochs: int
    momentum: float = 0.9
    weight_decay: float = 0.0
    accum_steps: int | None = None
    max_batch_per_step: int | None = None
    num_workers: int | None = None
    seed: int = 0
    precision: str = "fp32"  # the paper's; bf16 / fp16 autocast on CUDA when asked
    tensorboard: bool = False  # epoch records also under <run_dir>/tensorboard/ (rank 0)

    def scaled_lr(self) -> float:
        return self.lr * self.batch_size / 256


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    seconds: float
    images_per_second: float
    accum_steps: int
    micro_batch: int
    resumed_from_epoch: int | None = None
    warnings: list[str] = field(default_factory=list)


def clamp_batch(batch_size: int, train_size: int, what: str) -> tuple[int, list[str]]:
    """A batch larger than the training set becomes the training set, with a warning."""
    if batch_size < 1:
        raise MokdError("--batch-size must be at least 1")
    if train_size < 1:
        raise MokdError(f"{what}: the training set is empty")
    if batch_size <= train_size:
        return batch_size, []
    return train_size, [f"{what}: batch {batch_size} is larger than the {train_size} training images; "
                        f"using batch {train_size} (learning rate scaled for it)"]


def _micro_batching(settings: FitSettings, world_size: int) -> tuple[int, int]:
    """(accumulation steps, per-rank micro-batch) for the requested global batch."""
    per_rank = math.ceil(settings.batch_size / world_size)
    if settings.accum_steps is not None:
        if settings.accum_steps < 1:
            raise MokdError("--accum-steps must be at least 1")
        accum = settings.accum_steps
    elif settings.max_batch_per_step is not None:
        if settings.max_batch_per_step < 1:
            raise MokdError("--max-batch-per-step must be at least 1")
        accum = math.ceil(per_rank / settings.max_batch_per_step)
    else:
        accum = 1
    accum = min(accum, per_rank)
    return accum, math.ceil(per_rank / accum)


def _groups(loader: Iterable, size: int) -> Iterator[list]:
    group: list = []
    for item in loader:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def readable_batch(batch: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Collate the readable items of a batch: (images, labels, how many unreadable items were dropped). An item is
    None when its image cannot be read and --skip-bad-images is on."""
    kept = [item for item in batch if item is not None]
    images = torch.stack([image for image, _ in kept]) if kept else torch.empty(0)
    return images, torch.tensor([int(label) for _, label in kept], dtype=torch.long), len(batch) - len(kept)


def fit(model: Classifier, train_set: Dataset, settings: FitSettings, *, run_dir: Path, context: DistContext,
        resume: bool = False, signature: dict[str, Any] | None = None, desc: str = "train",
        on_epoch_end: Callable[[int], None] | None = None) -> FitResult:
    """Train `model` on `train_set` and return the per-epoch history.

    `run_dir` receives `checkpoint.pth` after every epoch and `log.jsonl`. With `resume`, training restarts
    from that checkpoint when it exists; `signature` (class count, protocol settings) must then match what the
    checkpoint was made with. `on_epoch_end(epoch)` runs after each epoch's checkpoint is written.
    """
    signature = {**(signature or {}), "epochs": settings.epochs, "batch_size": settings.batch_size,
                 "lr": settings.lr, "warmup_epochs": settings.warmup_epochs}
    device = context.device
    accum, micro = _micro_batching(settings, context.world_size)
    sampler = DistributedSampler(train_set, num_replicas=context.world_size, rank=context.rank, shuffle=True,
                                 seed=settings.seed, drop_last=False)
    workers = apply_resources(device.type, settings.num_workers).workers
    loader = DataLoader(train_set, batch_size=micro, sampler=sampler, num_workers=workers, collate_fn=readable_batch,
                        pin_memory=device.type == "cuda", persistent_workers=False, drop_last=False)
    steps_per_epoch = math.ceil(len(loader) / accum)
    schedule = cosine_schedule(settings.scaled_lr(), 0.0, settings.epochs, steps_per_epoch, settings.warmup_epochs)

    model.to(device)
    memory_format = torch.channels_last if model.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=float(schedule[0]), momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    autocast, scaler = autocast_for(device, settings.precision)
    network: nn.Module = model
    if context.distributed:
        if device.type == "cuda" and not model.frozen:
            network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
        network = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)

    run_dir = Path(run_dir)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    start_epoch, history, resumed = 0, [], None
    if resume and checkpoint_path.exists():
        state = load_resume_state(checkpoint_path, {"signature", "model", "optimizer", "rng", "epoch", "history"})
        _check_signature(state["signature"], signature, checkpoint_path)
        model.load_trainable_state(state["model"])
        restore_optimization(state, optimizer, scaler)
        restore_rng(state["rng"])  # torchvision's augmentations draw from torch only
        start_epoch = resumed = int(state["epoch"])
        history = list(state["history"])

    board = TensorBoardLog(run_dir, resumed) if settings.tensorboard and context.is_main else None
    images_seen, train_seconds = 0, 0.0
    for epoch in range(start_epoch, settings.epochs):
        sampler.set_epoch(epoch)
        network.train()
        sums = torch.zeros(4, dtype=torch.float64)  # loss sum, correct, images, unreadable images skipped
        epoch_start = time.perf_counter()
        with tqdm(total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{settings.epochs}", leave=False,
                  disable=not context.is_main, dynamic_ncols=True) as bar:
            for step, group in enumerate(_groups(loader, accum)):
                for group_index in range(len(optimizer.param_groups)):
                    optimizer.param_groups[group_index]["lr"] = float(schedule[epoch * steps_per_epoch + step])
                total = sum(len(labels) for _, labels, _ in group)
                sums[3] += sum(skipped for _, _, skipped in group)
                if not total:  # a whole step of unreadable images: nothing to learn from
                    bar.update(1)
                    continue
                for index, (images, labels, _) in enumerate(group):
                    if not len(labels):  # every image of this micro-batch was unreadable
                        continue
                    images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                    labels = labels.to(device, non_blocking=True)
                    sync = network.no_sync() if (context.distributed and index < len(group) - 1) else nullcontext()
                    with sync:
                        with autocast:
                            logits = network(images)
                        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
                        loss = loss_sum / total
                        scale_loss(loss, scaler).backward()
                    sums[:3] += torch.tensor([loss_sum.item(), (logits.argmax(1) == labels).sum().item(),
                                              len(labels)], dtype=torch.float64)
                if not torch.isfinite(sums[0]):
                    raise MokdError(f"{desc}: the training loss became non-finite in epoch {epoch + 1}, step "
                                    f"{step + 1}; lower the learning rate (--lr)")
                optimizer_step(optimizer, scaler)
                elapsed = time.perf_counter() - epoch_start
                bar.update(1)
                bar.set_postfix(loss=f"{sums[0] / max(sums[2], 1):.4f}", acc=f"{100 * sums[1] / max(sums[2], 1):.1f}",
                                img_s=f"{sums[2] * context.world_size / max(elapsed, 1e-9):.0f}")
        seconds = time.perf_counter() - epoch_start
        sums = context.sum(sums)
        images_seen += int(sums[2])
        train_seconds += seconds
        record = {"epoch": epoch + 1, "loss": float(sums[0] / sums[2]), "train_acc": float(100 * sums[1] / sums[2]),
                  "lr": float(schedule[min((epoch + 1) * steps_per_epoch - 1, len(schedule) - 1)]),
                  "images_per_s": float(sums[2] / seconds), "seconds": round(seconds, 3),
                  "skipped_images": int(sums[3])}
        history.append(record)
        if context.is_main:
            state = {"epoch": epoch + 1, "model": model.trainable_state(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler_state(scaler), "rng": capture_rng(),
                     "history": history, "signature": signature}
            atomic.save_torch(state, checkpoint_path)
            atomic.write_text(run_dir / LOG_NAME, "".join(json.dumps(entry) + "\n" for entry in history))
            if board is not None:
                board.write(record, step=epoch + 1)
                board.flush()
        context.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    if board is not None:
        board.close()
    if train_seconds > 0:
        rate = images_seen / train_seconds
    else:  # every epoch was done before this (resumed) run: report the recorded rate
        rate = history[-1]["images_per_s"] if history else 0.0
    return FitResult(history, train_seconds, rate, accum, micro, resumed)


def _check_signature(stored: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    if stored.get("num_classes") != current.get("num_classes"):
        raise MokdError(f"{path} was trained for {stored.get('num_classes')} classes but the dataset has "
                        f"{current.get('num_classes')}: use another output directory or drop --resume")
    if stored.get("data") != current.get("data"):
        raise MokdError(f"{path} was trained on other data (fingerprint {str(stored.get('data'))[:12]} vs "
                        f"{str(current.get('data'))[:12]}): use another output directory (--out) or drop --resume")
    differing = sorted(key for key in current if stored.get(key) != current[key])
    if differing:
        details = ", ".join(f"{key} {stored.get(key)!r} vs {current[key]!r}" for key in differing)
        raise MokdError(f"{path} was made with other settings ({details}): resume with the same settings, "
                        f"or use another output directory")


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int, num_workers: int | None,
             context: DistContext, desc: str = "eval") -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of `model` on `dataset`; under DDP each rank scores a strided shard."""
    shard = Subset(dataset, range(context.rank, len(dataset), context.world_size)) if context.distributed else dataset
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=apply_resources(context.device.type, num_workers).workers,
                        pin_memory=context.device.type == "cuda", collate_fn=readable_batch)
    model.eval()
    memory_format = torch.channels_last if getattr(model, "channels_last", False) else torch.contiguous_format
    counts = torch.zeros(4, dtype=torch.float64)  # top1, top5, n, unreadable images skipped
    for images, labels, skipped in tqdm(loader, desc=desc, leave=False, disable=not context.is_main,
                                        dynamic_ncols=True):
        counts[3] += skipped
        if not len(labels):
            continue
        images = images.to(context.device).contiguous(memory_format=memory_format)
        labels = labels.to(context.device)
        counts[:3] += topk_counts(model(images), labels)
    counts = context.sum(counts)
    if counts[2] == 0:
        raise MokdError(f"{desc}: the evaluation set is empty")
    return {"top1": float(100 * counts[0] / counts[2]), "top5": float(100 * counts[1] / counts[2]),
            "skipped_images": int(counts[3])}


def topk_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[top-1 hits, top-5 hits (top-C when fewer than 5 classes), count] of one batch."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return torch.tensor([hits[:, 0].sum().item(), hits.any(dim=1).sum().item(), len(labels)], dtype=torch.float64)


def settings_record(settings: FitSettings, result: FitResult) -> dict[str, Any]:
    """The protocol fields a results JSON records for one training run."""
    return {**asdict(settings), "scaled_lr": settings.scaled_lr(), "accum_steps": result.accum_steps,
            "micro_batch": result.micro_batch}
