"""Linear probing pieces: the many-head sweep on cached features, head files, and the frozen-backbone check.

The cached sweep trains every (learning rate x feature variant) head in one pass over the features (DINOv2's
idea): heads of one variant share a batched matmul, and each head's gradient is scaled by its own base lr,
which for momentum SGD without weight decay is exactly the update a separate optimizer at that lr would make.
Choice of the winner uses a held-out slice of the training features only.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mokd.core import atomic
from mokd.core.checkpoints import load_resume_state
from mokd.core.errors import MokdError
from mokd.core.features import FeatureKind
from mokd_eval.finetune import topk_counts
from mokd.core.registry import ArchSpec
from mokd.core.schedules import cosine_schedule
from mokd.core.tensorboard_log import TensorBoardLog

HEAD_FORMAT = "mokd_linear_head"
VIT_SWEEP_BLOCKS = (1, 4)
# Base learning rates per 256 images, per architecture family. A.2's "0.08 (ResNet) and 0.008 (ViT)" are the
# rates at its batch of 2,048: the official MOKD commands pass 0.01 / 0.001 and scale by batch / 256 (0.001 is
# DINO's ViT value too). One value for both families would cripple ResNets (lessons-from-peers item 10).
LINEAR_BASE_LR = {"resnet": 0.01, "vit": 0.001}
SWEEP_FACTORS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
SCORE_CHUNK = 8192  # held-out / validation rows scored at once
# Below this many multiply-adds per step, extra CPU threads only add synchronisation: measured on the 2-core
# machine, a digits-sized ViT sweep ran 30x slower with 2 threads than with 1 while other jobs were running.
SMALL_STEP_MACS = 1e9


@contextmanager
def _cpu_threads_for(step_macs: float, device: torch.device) -> Iterator[None]:
    """One CPU thread for small steps (see SMALL_STEP_MACS); the thread count is restored afterwards."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and step_macs < SMALL_STEP_MACS:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class BackboneChangedError(MokdError):
    """The frozen backbone's weights or BatchNorm statistics moved during a linear probe."""


def protocol_feature(spec: ArchSpec) -> FeatureKind:
    """DINO's linear-probe input: pooled vector (CNN); last 4 CLS tokens (ViT-S/T); last CLS + mean patch
    token (ViT-B and wider)."""
    if not spec.is_vit:
        return FeatureKind()
    if spec.embed_dim >= 768:
        return FeatureKind("last_cls", 1, True)
    return FeatureKind("last_cls", min(4, spec.depth))  # a ViT shallower than 4 blocks uses all of them


def sweep_source_feature(spec: ArchSpec) -> FeatureKind:
    """The one cached feature every variant of the sweep is sliced from: CNN pooled vector, or for a ViT the
    CLS tokens of the last 4 blocks plus the mean patch token (`last_cls:4+avgpool`)."""
    if not spec.is_vit:
        return FeatureKind()
    return FeatureKind("last_cls", min(max(VIT_SWEEP_BLOCKS), spec.depth), True)


def variant_columns(spec: ArchSpec, source: FeatureKind, variant: FeatureKind) -> np.ndarray:
    """Columns of a `source` feature that make up `variant` (blocks are stored oldest first, pooled last)."""
    if source.name != "last_cls":
        if variant != source:
            raise MokdError(f"feature {variant.describe()} cannot be taken from cached {source.describe()}")
        return np.arange(spec.feature_dim)
    dim = spec.embed_dim
    if variant.name != "last_cls" or variant.n_last > source.n_last or (variant.pool_patches and
                                                                      not source.pool_patches):
        raise MokdError(f"feature {variant.describe()} cannot be taken from cached {source.describe()}")
    columns = list(range((source.n_last - variant.n_last) * dim, source.n_last * dim))
    if variant.pool_patches:
        columns += list(range(source.n_last * dim, (source.n_last + 1) * dim))
    return np.array(columns)


def sweep_variants(spec: ArchSpec, requested: FeatureKind | None) -> list[FeatureKind]:
    """The feature variants the cached sweep tries: the requested one, or for ViTs n last blocks x pooling."""
    if requested is not None:
        return [requested]
    if not spec.is_vit:
        return [FeatureKind()]
    return [FeatureKind("last_cls", n, pool) for n in VIT_SWEEP_BLOCKS if n <= spec.depth for pool in (False, True)]


@dataclass
class SweepResult:
    heads: list[dict[str, Any]]  # one per head: variant, lr, held-out top1/top5
    winner: int
    weight: torch.Tensor  # the winner's Linear weight (C x D) and bias
    bias: torch.Tensor
    history: list[dict[str, Any]]
    seconds: float
    resumed_from_epoch: int | None


class _HeadBank(nn.Module):
    """`len(lrs)` linear heads per variant, stored as one (heads x C x D) weight per variant."""

    def __init__(self, dims: Sequence[int], num_heads: int, num_classes: int) -> None:
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(num_heads, num_classes, d) * 0.01) for d in dims])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(num_heads, num_classes)) for _ in dims])

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per variant: logits (batch x heads x C)."""
        outputs = []
        for x, w, b in zip(inputs, self.weights, self.biases):
            heads, classes, dim = w.shape
            outputs.append((x @ w.reshape(heads * classes, dim).T + b.reshape(-1)).view(len(x), heads, classes))
        return outputs


def train_head_sweep(features: np.ndarray, labels: np.ndarray, fit_index: np.ndarray, heldout_index: np.ndarray, *,
                     spec: ArchSpec, source: FeatureKind, variants: Sequence[FeatureKind], lrs: Sequence[float],
                     num_classes: int, data: str = "", epochs: int, batch_size: int, warmup_epochs: int, seed: int,
                     checkpoint_path: Path | None = None, resume: bool = False, device: str = "cpu",
                     desc: str = "heads", on_epoch_end: Callable[[int], None] | None = None,
                     tensorboard: bool = False) -> SweepResult:
    """Train every (variant, lr) head on `features[fit_index]` with SGD (momentum 0.9, no weight decay, lr x
    batch/256, warm-up + cosine) and pick the best on `features[heldout_index]` by top-1 (then top-5). `data` is
    the training split's fingerprint: a resume must come from the same data, not only the same class count.
    `tensorboard`: the epoch records also go to <checkpoint_path's folder>/tensorboard/."""
    torch_device = torch.device(device)
    columns = [torch.as_tensor(variant_columns(spec, source, v)) for v in variants]
    all_x = torch.as_tensor(np.ascontiguousarray(features))  # float16 caches stay float16 in memory
    all_y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    fit_rows = torch.as_tensor(np.asarray(fit_index, dtype=np.int64))  # rows are gathered per batch: no copy
    steps_per_epoch = math.ceil(len(fit_rows) / batch_size)
    schedule = cosine_schedule(batch_size / 256, 0.0, epochs, steps_per_epoch, warmup_epochs)
    lr_weights = torch.tensor(list(lrs), dtype=torch.float32, device=torch_device)

    torch.manual_seed(seed)
    bank = _HeadBank([len(c) for c in columns], len(lrs), num_classes).to(torch_device)
    optimizer = torch.optim.SGD(bank.parameters(), lr=float(schedule[0]), momentum=0.9, weight_decay=0.0)
    signature = {"num_classes": num_classes, "variants": [v.describe() for v in variants], "lrs": list(lrs),
                 "epochs": epochs, "batch_size": batch_size, "warmup_epochs": warmup_epochs, "seed": seed,
                 "fit_images": len(fit_index), "data": data}
    start_epoch, history, resumed = 0, [], None
    if resume and checkpoint_path is not None and checkpoint_path.exists():
        state = load_resume_state(checkpoint_path, {"signature", "heads", "optimizer", "rng", "epoch", "history"})
        stored = state["signature"]
        if stored.get("num_classes") != num_classes:
            raise MokdError(f"{checkpoint_path} holds heads for {stored.get('num_classes')} classes but the dataset "
                            f"has {num_classes}: use another --out or drop --resume")
        if stored.get("data") != data:
            raise MokdError(f"{checkpoint_path} holds heads trained on other data (fingerprint "
                            f"{str(stored.get('data'))[:12]} vs {data[:12]}): use another --out or drop --resume")
        if stored != signature:
            raise MokdError(f"{checkpoint_path} was made with other sweep settings: resume with the same options "
                            "or use another --out")
        bank.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start_epoch = resumed = int(state["epoch"])
        history = list(state["history"])

    board = TensorBoardLog(checkpoint_path.parent, resumed) if tensorboard and checkpoint_path is not None else None
    start = time.perf_counter()
    step_macs = batch_size * len(lrs) * num_classes * sum(len(c) for c in columns)
    with _cpu_threads_for(step_macs, torch_device):
        for epoch in range(start_epoch, epochs):
            order = torch.randperm(len(fit_rows), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
            loss_sum, seen, correct = 0.0, 0, None
            epoch_start = time.perf_counter()
            bar = tqdm(range(steps_per_epoch), desc=f"{desc} {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
            for step in bar:
                optimizer.param_groups[0]["lr"] = float(schedule[epoch * steps_per_epoch + step])
                rows = fit_rows[order[step * batch_size:(step + 1) * batch_size]]
                x, y = all_x[rows].to(torch_device, torch.float32), all_y[rows].to(torch_device)
                losses, hits = [], []
                for logits in bank([x[:, c] for c in columns]):
                    batch_size_now, heads, classes = logits.shape
                    per_item = F.cross_entropy(logits.reshape(-1, classes), y.repeat_interleave(heads), reduction="none")
                    losses.append(per_item.view(batch_size_now, heads).mean(dim=0))
                    hits.append((logits.detach().argmax(dim=-1) == y[:, None]).sum(dim=0))
                per_head_loss = torch.stack(losses)  # variants x heads
                correct = torch.stack(hits) if correct is None else correct + torch.stack(hits)
                (per_head_loss * lr_weights).sum().backward()  # each head's gradient scaled by its own base lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += per_head_loss.detach().min().item() * len(y)
                seen += len(y)
                elapsed = time.perf_counter() - epoch_start
                bar.set_postfix(best_loss=f"{loss_sum / seen:.4f}", best_acc=f"{100 * correct.max().item() / seen:.1f}",
                                img_s=f"{seen / max(elapsed, 1e-9):.0f}")
            if not math.isfinite(loss_sum):
                raise MokdError(f"{desc}: every head's loss is non-finite in epoch {epoch + 1}; lower the learning rates")
            history.append({"epoch": epoch + 1, "best_head_loss": loss_sum / seen,
                            "best_head_train_acc": 100 * correct.max().item() / seen,
                            "images_per_s": seen / max(time.perf_counter() - epoch_start, 1e-9)})
            if board is not None:
                board.write(history[-1], step=epoch + 1)
                board.flush()
            if checkpoint_path is not None:
                atomic.save_torch({"epoch": epoch + 1, "heads": bank.state_dict(), "optimizer": optimizer.state_dict(),
                                   "rng": torch.get_rng_state(), "history": history, "signature": signature},
                                  checkpoint_path)
            if on_epoch_end is not None:
                on_epoch_end(epoch)
    seconds = time.perf_counter() - start
    if board is not None:
        board.close()

    counts = torch.zeros(len(variants), len(lrs), 3, dtype=torch.float64)  # top1, top5, n per head
    with torch.no_grad():
        for start_row in range(0, len(heldout_index), SCORE_CHUNK):  # bounded memory: rows x heads x classes
            rows = heldout_index[start_row:start_row + SCORE_CHUNK]
            held_x, held_y = all_x[rows].to(torch_device, torch.float32), all_y[rows].to(torch_device)
            for v_index, logits in enumerate(bank([held_x[:, c] for c in columns])):
                for h_index in range(len(lrs)):
                    counts[v_index, h_index] += topk_counts(logits[:, h_index], held_y)
    heads = [{"feature": variants[v].describe(), "lr": lr, "variant": v, "head": h,
              "heldout_top1": float(100 * counts[v, h, 0] / counts[v, h, 2]),
              "heldout_top5": float(100 * counts[v, h, 1] / counts[v, h, 2])}
             for v in range(len(variants)) for h, lr in enumerate(lrs)]
    winner = max(range(len(heads)), key=lambda i: (heads[i]["heldout_top1"], heads[i]["heldout_top5"], -i))
    best = heads[winner]
    weight = bank.weights[best["variant"]][best["head"]].detach().cpu().clone()
    bias = bank.biases[best["variant"]][best["head"]].detach().cpu().clone()
    return SweepResult(heads, winner, weight, bias, history, seconds, resumed)


def cross_validated_sweep(features: np.ndarray, labels: np.ndarray, folds: Sequence[np.ndarray], *,
                          variants: Sequence[FeatureKind], lrs: Sequence[float], checkpoint_dir: Path | None,
                          desc: str = "heads", **sweep: Any) -> SweepResult:
    """The sweep scored by k-fold cross-validation (small training sets, where a 10 % slice is a handful of
    images): every head is trained k times, each time scored on the fold left out; the head with the best mean
    held-out top-1 (then top-5) is trained once more on all the training rows, and that head is returned."""
    every = np.sort(np.concatenate(folds))
    runs = []
    for number, held in enumerate(folds):
        path = checkpoint_dir / f"checkpoint-fold{number + 1}.pth" if checkpoint_dir is not None else None
        runs.append(train_head_sweep(features, labels, np.setdiff1d(every, held), held, variants=variants, lrs=lrs,
                                     checkpoint_path=path, desc=f"{desc} fold {number + 1}/{len(folds)}", **sweep))
    heads = [{**head, "heldout_top1": float(np.mean([run.heads[index]["heldout_top1"] for run in runs])),
              "heldout_top5": float(np.mean([run.heads[index]["heldout_top5"] for run in runs]))}
             for index, head in enumerate(runs[0].heads)]
    winner = max(range(len(heads)), key=lambda i: (heads[i]["heldout_top1"], heads[i]["heldout_top5"], -i))
    best = heads[winner]
    final = train_head_sweep(features, labels, every, every, variants=[variants[best["variant"]]], lrs=[best["lr"]],
                             checkpoint_path=checkpoint_dir / "checkpoint.pth" if checkpoint_dir is not None else None,
                             desc=f"{desc} final", **sweep)
    return SweepResult(heads, winner, final.weight, final.bias, final.history,
                       final.seconds + sum(run.seconds for run in runs), final.resumed_from_epoch)


def evaluate_head(weight: torch.Tensor, bias: torch.Tensor, features: np.ndarray, labels: np.ndarray,
                  columns: np.ndarray) -> dict[str, float]:
    """Top-1/top-5 (percent) of one linear head on (cached) features."""
    counts = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(labels), SCORE_CHUNK):
            x = torch.as_tensor(np.ascontiguousarray(features[start:start + SCORE_CHUNK, columns], dtype=np.float32))
            y = torch.as_tensor(np.asarray(labels[start:start + SCORE_CHUNK], dtype=np.int64))
            counts += topk_counts(x @ weight.T + bias, y)
    return {"top1": float(100 * counts[0] / counts[2]), "top5": float(100 * counts[1] / counts[2])}


def save_head(path: str | Path, head: nn.Linear | tuple[torch.Tensor, torch.Tensor], *, feature: FeatureKind,
              spec: ArchSpec, classes: Sequence[str], source: dict[str, Any]) -> Path:
    """A head file that stands alone: weights, the feature it reads, the backbone and class names."""
    weight, bias = (head.weight, head.bias) if isinstance(head, nn.Linear) else head
    return atomic.save_torch({"format": HEAD_FORMAT, "weight": weight.detach().cpu().clone(),
                              "bias": bias.detach().cpu().clone(), "feature": feature.describe(),
                              "arch": spec.to_dict(), "classes": list(classes), "source": source}, path)


def load_head(path: str | Path) -> tuple[nn.Linear, dict[str, Any]]:
    """A saved head as an `nn.Linear`, plus what it was trained on (feature, arch, classes, source)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != HEAD_FORMAT:
        raise MokdError(f"{path} is not a mokd linear head file")
    weight = state["weight"]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": state["bias"]})
    return head, {key: value for key, value in state.items() if key not in ("weight", "bias")}


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every tensor of `module` (weights and BatchNorm statistics) to compare against later."""
    return {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}


def verify_unchanged(module: nn.Module, before: dict[str, torch.Tensor], what: str) -> None:
    """MoCo's sanity check: after a linear probe the backbone must be exactly what it was."""
    after = module.state_dict()
    changed = [name for name, tensor in before.items() if not torch.equal(tensor, after[name].detach().cpu())]
    if changed:
        raise BackboneChangedError(f"{what}: the frozen backbone changed during the linear probe "
                                   f"({len(changed)} tensors, e.g. {', '.join(changed[:3])}); the result is invalid")
