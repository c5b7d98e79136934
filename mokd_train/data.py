"""The trainer's training data: seeded multi-crop views of a training split.

Each sample's crops come from an RNG seeded by (seed, epoch, index), so a run resumed mid-epoch reproduces the
uninterrupted one exactly and W processes see the global batches of one.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from mokd.core.data import DataSpec
from mokd.core.errors import MokdError
from mokd_train.augment import MultiCropConfig
from mokd_train.config import AUGMENTATION_PROBABILITIES, TrainConfig


class SeededCrops(Dataset):
    """Multi-crop views whose randomness depends only on (seed, epoch, index).

    Keys are `(epoch, index)` from `EpochShardSampler`. The transform runs under a forked torch RNG
    seeded from those three numbers, so the crops of a sample do not depend on the worker, the rank,
    or on what ran before: the condition for exact resumption and for 1-vs-W-process equality.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> list[torch.Tensor]:
        epoch, index = key
        sample_seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        for offset in range(len(self.dataset)):  # with --skip-bad-images an unreadable image reads as None
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                item = self.dataset[(index + offset) % len(self.dataset)]
            if item is not None:
                return item[0]
        raise MokdError("no image of the training split could be read (--skip-bad-images skipped them all)")


def multicrop_config(cfg: TrainConfig, data_spec: DataSpec) -> MultiCropConfig:
    """The configured crop sizes and scales on the recipe that suits the data (32 px sets: weaker blur)."""
    recipe = MultiCropConfig.small if data_spec.native_size is not None else MultiCropConfig
    probabilities = {key: getattr(cfg, key) for key in AUGMENTATION_PROBABILITIES if getattr(cfg, key) is not None}
    return recipe(global_size=cfg.img_size, local_size=cfg.local_size, n_local=cfg.n_local,
                  global_scale=cfg.global_scale, local_scale=cfg.local_scale, **probabilities)
