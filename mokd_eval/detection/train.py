"""Training and evaluation loops of the torchvision C4 engine, with detectron2's solver.

SGD momentum 0.9, weight decay 1e-4 (0 on norm parameters), lr 0.02 per 16 images scaled linearly,
linear warm-up from 0.001x, x0.1 at 2/3 and 8/9 of the schedule (1x = 90k, 2x = 180k iterations);
fp32 (MoCo's detectron2 configs; bf16 / fp16 autocast on CUDA when asked), DDP under torchrun, periodic
checkpoints and resume, precise BN before evaluation.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.ops.misc import FrozenBatchNorm2d
from tqdm import tqdm

from mokd.core import atomic
from mokd_eval.detection.coco_data import CocoSplit, DetectionDataset, collate
from mokd_eval.detection.evaluation import evaluate, to_coco_results
from mokd.core.distributed import DistContext
from mokd.core.training_loop import autocast_for, optimizer_step, restore_optimization, scale_loss, scaler_state
from mokd.core.errors import MokdError
from mokd.core.tensorboard_log import TensorBoardLog

SCHEDULES = {"1x": 90_000, "2x": 180_000}
PAPER_SCHEDULE = "2x"  # A.5: "trained for 180k iterations, i.e., the 2x schedule"
REFERENCE_BATCH = 16
STEP_FRACTIONS = (2 / 3, 8 / 9)  # (60k, 80k) of 90k and (120k, 160k) of 180k
WARMUP_ITERS = 1000
WARMUP_FACTOR = 0.001
LAST_CHECKPOINT = "detector_last.pt"
FINAL_WEIGHTS = "detector_final.pt"
NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class Solver:
    """detectron2's solver; `lr` is per 16 images and scaled to `batch_size`."""

    iters: int
    batch_size: int = 16
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = WARMUP_ITERS
    checkpoint_period: int = 5000
    precise_bn_iters: int = 200

    @property
    def scaled_lr(self) -> float:
        return self.lr * self.batch_size / REFERENCE_BATCH

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(round(self.iters * fraction) for fraction in STEP_FRACTIONS)

    def lr_at(self, iteration: int) -> float:
        """Learning rate of 0-based `iteration`: linear warm-up, then x0.1 at each step."""
        factor = 0.1 ** sum(iteration >= step for step in self.steps)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            factor *= WARMUP_FACTOR * (1 - alpha) + alpha
        return self.scaled_lr * factor

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "scaled_lr": self.scaled_lr, "steps": list(self.steps)}


def schedule_iters(schedule: str | None, iters: int | None) -> int:
    """`--iters N` wins over `--schedule 1x|2x` (steps stay proportional); no schedule = the paper's."""
    schedule = schedule or PAPER_SCHEDULE
    if iters is not None:
        if iters < 1:
            raise MokdError(f"--iters must be at least 1, got {iters}")
        return iters
    if schedule not in SCHEDULES:
        raise MokdError(f"--schedule {schedule!r}: use one of {', '.join(SCHEDULES)} or give --iters N")
    return SCHEDULES[schedule]


def default_warmup(iters: int) -> int:
    """detectron2's 1000 warm-up iterations, shortened to a tenth of very short runs."""
    return max(1, min(WARMUP_ITERS, iters // 10))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on every trainable parameter except those of normalisation layers."""
    decay, no_decay = [], []
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            if parameter.requires_grad:
                (no_decay if isinstance(module, NORM_TYPES) else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _to(device: torch.device, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]):
    return ([image.to(device, non_blocking=True) for image in images],
            [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets])


def _loader(dataset: Dataset, batch_size: int, samples: int, seed: int, workers: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, replacement=True, num_samples=samples, generator=generator)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      drop_last=True, persistent_workers=False)


@dataclass
class TrainState:
    """What a checkpoint restores; `categories` guards against resuming on other data."""

    iteration: int
    categories: list[int]


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, state: TrainState,
                    extra: dict[str, Any]) -> None:
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": state.iteration,
               "categories": state.categories, "scaler": scaler_state(scaler), **extra}
    atomic.save_torch(payload, path)


def load_detector_file(path: Path) -> dict[str, Any]:
    """A detector checkpoint written by this engine (tensors and plain containers only)."""
    if not path.is_file():
        raise MokdError(f"detector checkpoint {path} does not exist: check --weights / --output-dir")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for damaged files
        raise MokdError(f"detector checkpoint {path} cannot be read ({type(error).__name__}): "
                        "it is truncated or not written by mokd-eval coco") from None
    if not isinstance(payload, dict) or "model" not in payload or "categories" not in payload:
        raise MokdError(f"{path} is not a detector checkpoint written by mokd-eval coco (no 'model'/'categories')")
    return payload


def check_categories(path: Path, saved: list[int], data_categories: list[int]) -> None:
    if list(saved) != list(data_categories):
        raise MokdError(f"{path} was trained on categories {saved[:6]}{'...' if len(saved) > 6 else ''} "
                        f"({len(saved)}), the data has {len(data_categories)} categories "
                        f"{data_categories[:6]}{'...' if len(data_categories) > 6 else ''}: use the same --data")


def divergence_message(value: float, iteration: int, model: nn.Module) -> str:
    """Suggest --norm syncbn only to a run that does not use it already."""
    frozen = any(isinstance(module, FrozenBatchNorm2d) for module in model.modules())
    advice = ("lower --lr or use --norm syncbn (random-init ResNets diverge with frozen BN)" if frozen
              else "lower --lr, or check the annotations for degenerate boxes")
    return f"loss became {value} at iteration {iteration}: {advice}"


def train_detector(model: nn.Module, dataset: DetectionDataset, solver: Solver, *, output_dir: Path,
                   categories: list[int], context: DistContext, seed: int, resume: bool, num_workers: int,
                   extra: dict[str, Any], echo: Callable[[str], None], precision: str = "fp32",
                   tensorboard: bool = False) -> dict[str, Any]:
    """Train `model` in place for `solver.iters` iterations; returns the loss history and throughput.
    `tensorboard`: each iteration's losses and lr also go to <output_dir>/tensorboard/ (rank 0)."""
    device = context.device
    model.to(device).train()
    optimizer = torch.optim.SGD(param_groups(model, solver.weight_decay), lr=solver.scaled_lr,
                                momentum=solver.momentum)
    autocast, scaler = autocast_for(device, precision)
    state = TrainState(0, list(categories))
    last = output_dir / LAST_CHECKPOINT
    if resume:
        if not last.is_file():
            raise MokdError(f"--resume: no {LAST_CHECKPOINT} in {output_dir}: start without --resume")
        payload = load_detector_file(last)
        check_categories(last, payload["categories"], categories)
        model.load_state_dict(payload["model"], strict=True)
        restore_optimization(payload, optimizer, scaler)
        state.iteration = int(payload["iteration"])
        echo(f"resumed from {last} at iteration {state.iteration}")
    net: nn.Module = model
    if context.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    per_rank = max(1, solver.batch_size // context.world_size)
    remaining = solver.iters - state.iteration
    history: list[dict[str, float]] = []
    board = TensorBoardLog(output_dir, state.iteration if resume else None) if tensorboard and context.is_main else None
    start = time.perf_counter()
    if remaining > 0:
        loader = _loader(dataset, per_rank, remaining * per_rank, seed * 1000 + context.rank + state.iteration,
                         num_workers)
        bar = tqdm(loader, total=remaining, initial=0, desc="train", disable=not context.is_main, leave=False)
        for images, targets in bar:
            lr = solver.lr_at(state.iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, targets = _to(device, images, targets)
            with autocast:
                losses = net(images, targets)
            total = sum(losses.values())
            if not math.isfinite(value := float(total.detach())):
                raise MokdError(divergence_message(value, state.iteration, model))
            scale_loss(total, scaler).backward()
            optimizer_step(optimizer, scaler)
            state.iteration += 1
            record = {k: round(float(v.detach()), 4) for k, v in losses.items()}
            history.append({"iteration": state.iteration, "lr": lr, "loss": round(value, 4), **record})
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2g}")
            if board is not None:
                board.write(history[-1], step=state.iteration)
            if context.is_main and (state.iteration % solver.checkpoint_period == 0 or state.iteration == solver.iters):
                save_checkpoint(last, model, optimizer, scaler, state, extra)
        bar.close()
    if board is not None:
        board.close()
    seconds = time.perf_counter() - start
    return {"iterations_run": remaining, "seconds": round(seconds, 3),
            "iters_per_second": round(remaining / seconds, 4) if remaining > 0 and seconds > 0 else None,
            "first_losses": history[:1], "last_losses": history[-1:]}


@torch.no_grad()
def precise_bn(model: nn.Module, dataset: DetectionDataset, iters: int, batch_size: int, device: torch.device,
               seed: int, num_workers: int) -> int:
    """Recompute BatchNorm running statistics as exact averages over `iters` training batches (detectron2's
    PRECISE_BN): momentum-averaged statistics lag behind the weights at the end of training."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or iters <= 0:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over the batches seen
    model.train()
    for images, targets in tqdm(_loader(dataset, batch_size, iters * batch_size, seed + 7, num_workers),
                                total=iters, desc="precise BN", leave=False):
        model(*_to(device, images, targets))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return iters


@torch.no_grad()
def evaluate_detector(model: nn.Module, split: CocoSplit, categories: list[int], device: torch.device,
                      desc: str = "evaluate", precision: str = "fp32") -> tuple[dict[str, dict[str, float]], float]:
    """COCO bbox/segm metrics of `model` on every image of `split`, and images per second."""
    model.to(device).eval()
    autocast, _ = autocast_for(device, precision)
    dataset = DetectionDataset(split, categories, train=False)
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    for index in tqdm(range(len(dataset)), desc=desc, leave=False):
        image, target = dataset[index]
        with autocast:
            detection = model([image.to(device)])[0]
        results.extend(to_coco_results(int(target["image_id"]), detection, categories))
    seconds = time.perf_counter() - start
    metrics = evaluate(split.coco, results, image_ids=dataset.ids)
    return metrics, len(dataset) / seconds if seconds > 0 else math.nan
