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

# Above this share of an epoch's samples replaced, the run trains on a visibly different (repeated) subset.
REPLACED_WARNING_SHARE = 0.05


class SeededCrops(Dataset):
    """Multi-crop views whose randomness depends only on (seed, epoch, index).

    Keys are `(epoch, index)` from `EpochShardSampler`. The transform runs under a forked torch RNG
    seeded from those three numbers, so the crops of a sample do not depend on the worker, the rank,
    or on what ran before: the condition for exact resumption and for 1-vs-W-process equality.

    An item is `(crops, replaced)`: `replaced` is 1 when the sample's own image was unreadable and the next
    readable one stood in for it (`--skip-bad-images`), else 0. It travels with the batch because DataLoader
    workers are separate processes: the training loop is the one place that sees every sample of its rank.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor], int]:
        epoch, index = key
        sample_seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        for offset in range(len(self.dataset)):  # with --skip-bad-images an unreadable image reads as None
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                item = self.dataset[(index + offset) % len(self.dataset)]
            if item is not None:
                return item[0], int(offset > 0)
        raise MokdError("no image of the training split could be read (--skip-bad-images skipped them all)")


def multicrop_config(cfg: TrainConfig, data_spec: DataSpec) -> MultiCropConfig:
    """The configured crop sizes and scales on the recipe that suits the data (32 px sets: weaker blur)."""
    recipe = MultiCropConfig.small if data_spec.native_size is not None else MultiCropConfig
    probabilities = {key: getattr(cfg, key) for key in AUGMENTATION_PROBABILITIES if getattr(cfg, key) is not None}
    return recipe(global_size=cfg.img_size, local_size=cfg.local_size, n_local=cfg.n_local,
                  global_scale=cfg.global_scale, local_scale=cfg.local_scale, **probabilities)


def replaced_images_report(replaced: int, samples: int) -> tuple[str | None, str | None]:
    """The log line and, above `REPLACED_WARNING_SHARE`, the warning for `replaced` unreadable images among
    `samples` (one epoch, all ranks); (None, None) when none was replaced."""
    if not replaced:
        return None, None
    share = replaced / samples
    line = (f"  --skip-bad-images: {replaced} of {samples} samples ({100 * share:.1f} %) had an unreadable image, "
            f"replaced by the next readable one")
    if share < REPLACED_WARNING_SHARE:
        return line, None
    return line, (f"{100 * share:.1f} % of the training samples were unreadable (over "
                  f"{100 * REPLACED_WARNING_SHARE:.0f} %): their neighbours are seen twice as often; fix or remove "
                  f"the broken files")
