"""DINO's multi-crop augmentation: two global views and several small local views of one image.

The three view recipes follow DINO (and MOKD, which reuses them): bicubic random resized crop,
horizontal flip, colour jitter, grayscale, then Gaussian blur with probability 1.0 / 0.1 / 0.5
(global 1 / global 2 / locals) and solarisation on global 2 only. Every random draw comes from
torchvision's transforms, which use torch's RNG only, so `torch.manual_seed` (and DataLoader's
per-worker torch seeds) make the crops reproducible and a trainer can save and restore them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T

from mokd.core.data import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class MultiCropConfig:
    """Every knob of the multi-crop recipe; the defaults are DINO's ImageNet settings (MOKD README scales)."""

    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    global1_blur_p: float = 1.0
    global2_blur_p: float = 0.1
    local_blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # Kernel side = this fraction of the crop side, made odd (224 -> 23, 96 -> 9, 32 -> 3); 1 means no blur.
    blur_kernel_fraction: float = 0.1
    solarize_p: float = 0.2  # global 2 only
    solarize_threshold: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def small(cls, **overrides) -> MultiCropConfig:
        """The 32 px variant (CIFAR, digits, shapes): 32 px globals, 16 px locals.

        Scales are wider at the low end than DINO's locals would allow: 5% of a 32 px image is a 7 px
        patch, too little to recognise anything, so locals take 10-30% and globals 30-100%. Blur is
        weakened: the images are already soft and DINO's sigma up to 2 px would erase a small object,
        so sigma is 0.1-1.0 with a 3x3 kernel on globals, and 16 px locals are not blurred at all.
        """
        settings = dict(
            global_size=32,
            local_size=16,
            global_scale=(0.3, 1.0),
            local_scale=(0.1, 0.3),
            blur_sigma=(0.1, 1.0),
            global1_blur_p=0.5,
            local_blur_p=0.0,
        )
        return cls(**(settings | overrides))

    def blur_kernel(self, crop_size: int) -> int:
        """Odd Gaussian kernel side for a crop of `crop_size` pixels."""
        return int(crop_size * self.blur_kernel_fraction) // 2 * 2 + 1


class MultiCropAugmentation:
    """PIL image -> list of 2 + n_local normalised float tensors: [global 1, global 2, local 1, ...]."""

    def __init__(self, config: MultiCropConfig | None = None) -> None:
        self.config = config or MultiCropConfig()
        c = self.config
        self.global1 = self._view(c.global_size, c.global_scale, c.global1_blur_p, solarize_p=0.0)
        self.global2 = self._view(c.global_size, c.global_scale, c.global2_blur_p, solarize_p=c.solarize_p)
        self.local = self._view(c.local_size, c.local_scale, c.local_blur_p, solarize_p=0.0)

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [self.global1(image), self.global2(image)] + [self.local(image) for _ in range(self.config.n_local)]

    def _view(
        self, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float
    ) -> Callable[[Image.Image], torch.Tensor]:
        """One view's pipeline; steps with probability 0 are left out so they draw no random numbers."""
        c = self.config
        steps: list[Callable] = [
            T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(c.flip_p),
            T.RandomApply([T.ColorJitter(*c.jitter)], p=c.jitter_p),
            T.RandomGrayscale(c.grayscale_p),
        ]
        kernel = c.blur_kernel(size)
        if blur_p > 0 and kernel > 1:
            steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=c.blur_sigma)], p=blur_p))
        if solarize_p > 0:
            steps.append(T.RandomSolarize(c.solarize_threshold, p=solarize_p))
        steps += [T.ToTensor(), T.Normalize(c.mean, c.std)]
        return T.Compose(steps)
