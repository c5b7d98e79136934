"""One code path for a single process and for `torchrun` DDP, shared by evaluation and training.

Placement: without a launcher this is world size 1 and no process group. Under torchrun (RANK / WORLD_SIZE /
LOCAL_RANK in the environment) `setup` joins the group (nccl on CUDA, gloo on CPU) and binds the rank's GPU.

Training: batch norms are synchronised across ranks, students are wrapped in DDP, and every rank reads its
interleaved share of the same seeded permutation, so a 2-process run sees exactly the global batches of a
1-process run.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as collectives
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Sampler

from mokd.core.errors import MokdError
from mokd.core.validation import check_device


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool  # True when `setup` created the group, so `teardown` destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object) on every rank; `value` itself for one process."""
        if not self.distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a copy; the input is untouched)."""
        total = values.detach().clone().to(self.device)
        if self.distributed:
            dist.all_reduce(total)
        return total.cpu()


def choose_device(preference: str, local_rank: int = 0) -> torch.device:
    """"auto" is CUDA when available; "cuda" is this rank's GPU, "cuda:N" GPU N (one process only).
    Asking for CUDA on a machine without it is a user error."""
    preference = check_device(preference)
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise MokdError(f"--device {preference} was requested but no CUDA device is available: "
                        f"use --device cpu or auto")
    index = int(preference.split(":")[1]) if ":" in preference else local_rank
    if index >= torch.cuda.device_count():
        raise MokdError(f"--device {preference}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0")
    return torch.device("cuda", index)


def setup(device_preference: str) -> DistContext:
    """Join the process group torchrun describes in the environment, or run as a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistContext(0, 1, 0, choose_device(device_preference), owns_process_group=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_process_group=owns)


def teardown(context: DistContext) -> None:
    if context.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


# --- training under DDP ---------------------------------------------------------------------------------------


class _AllReduceBatchNorm:
    """Batch norm whose training statistics span all ranks, for gloo/CPU runs.

    torch's SyncBatchNorm refuses CPU tensors; this does the same with two differentiable
    all-reduces (sum, then centred sum of squares), so gradients flow back through the shared
    statistics exactly as in SyncBatchNorm and a 2-rank run normalises like one process with the
    whole batch. Same parameters and buffers as the plain layer, so state dicts are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]  # every dimension but the channels
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        count = torch.tensor(float(x.numel() // x.shape[1]))
        dist.all_reduce(count)
        mean = _differentiable_sum(x.sum(dim=dims)) / count
        centred = x - mean.view(shape)
        var = _differentiable_sum(centred.square().sum(dim=dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * count / (count - 1), factor)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            return centred * (scale * self.weight).view(shape) + self.bias.view(shape)
        return centred * scale.view(shape)


class AllReduceBatchNorm2d(_AllReduceBatchNorm, nn.BatchNorm2d):
    """A CNN's BatchNorm2d with cross-rank statistics (see `_AllReduceBatchNorm`)."""


class AllReduceBatchNorm1d(_AllReduceBatchNorm, nn.BatchNorm1d):
    """An MLP-Head's BatchNorm1d (`mlp_bn`) with cross-rank statistics (see `_AllReduceBatchNorm`)."""


def _differentiable_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks whose backward sums the gradients over ranks (torch's functional collective)."""
    return collectives.all_reduce(values, "sum", dist.group.WORLD)


def synchronise_batchnorm(module: nn.Module, context: DistContext) -> None:
    """In place: make every BatchNorm of `module` use cross-rank statistics (no-op for one process).

    On CUDA the layers are swapped for torch's SyncBatchNorm (sharing the same parameters); on CPU
    their class becomes AllReduceBatchNorm2d/1d, which adds behaviour but no state.
    """
    if not context.distributed:
        return
    if context.device.type == "cuda":
        for name, child in list(module.named_children()):
            converted = nn.SyncBatchNorm.convert_sync_batchnorm(child)
            if converted is not child:
                setattr(module, name, converted)
        return
    replacements = {nn.BatchNorm2d: AllReduceBatchNorm2d, nn.BatchNorm1d: AllReduceBatchNorm1d}
    for layer in module.modules():
        if type(layer) in replacements:
            layer.__class__ = replacements[type(layer)]


def ddp_wrapper(context: DistContext, find_unused_parameters: bool) -> Callable[[nn.Module], nn.Module]:
    """What `MokdPair.wrap_students` applies to each student."""
    device_ids = [context.device.index] if context.device.type == "cuda" else None

    def wrap(module: nn.Module) -> nn.Module:
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)

    return wrap


class EpochShardSampler(Sampler[tuple[int, int]]):
    """This rank's share of epoch `epoch`'s seeded permutation, as `(epoch, index)` keys.

    The permutation is DistributedSampler's (seeded with seed + epoch; the tail that does not
    divide evenly is dropped), so rank r of W gets positions r, r+W, ... and a W-rank run covers
    the same global batches as one process. `skip` drops this rank's first samples: resuming
    mid-epoch continues exactly where the interrupted run stopped. The epoch travels with every
    index so per-sample augmentation can be seeded from it, even inside worker processes.
    """

    def __init__(self, dataset: Dataset, context: DistContext, seed: int, epoch: int, skip: int = 0) -> None:
        self.shards = DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank,
                                         shuffle=True, seed=seed, drop_last=True)
        self.shards.set_epoch(epoch)
        self.epoch = epoch
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in itertools.islice(iter(self.shards), self.skip, None))

    def __len__(self) -> int:
        return max(len(self.shards) - self.skip, 0)

    @staticmethod
    def samples_per_rank(dataset_size: int, world_size: int) -> int:
        """How many samples each rank gets per epoch (DistributedSampler with drop_last)."""
        return dataset_size // world_size
