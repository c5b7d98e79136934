"""Process placement shared by evaluation and training: a single process or one rank of `torchrun`.

Without a launcher this is world size 1 and no process group. Under torchrun (RANK / WORLD_SIZE /
LOCAL_RANK in the environment) `setup` joins the group (nccl on CUDA, gloo on CPU) and binds the rank's GPU.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mokd_eval.errors import MokdError
from mokd_eval.validation import check_device, check_precision

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


def autocast_for(device: torch.device, precision: str) -> tuple[AbstractContextManager, "torch.amp.GradScaler | None"]:
    """The forward's autocast for `precision` and, for fp16 training, its gradient scaler (None otherwise).

    fp32 is the paper's precision and the default. bf16 / fp16 are CUDA autocast; on a CPU they are refused,
    because they are slower there and a run must record the precision it really used."""
    if check_precision(precision) == "fp32":
        return nullcontext(), None
    if device.type != "cuda":
        raise MokdError(f"--precision {precision} needs a CUDA device (on a CPU it is slower, not faster): "
                        "use --precision fp32")
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return torch.autocast("cuda", dtype=_AUTOCAST_DTYPES[precision]), scaler


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
