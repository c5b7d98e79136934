"""Tests for mokd_train.augment: DINO multi-crop views, their sizes, recipes per view, and RNG use."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mokd.core.data import IMAGENET_MEAN, IMAGENET_STD
from mokd_train.augment import MultiCropAugmentation, MultiCropConfig


def _photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _normalised(pixels: np.ndarray) -> torch.Tensor:
    """Plain ToTensor + ImageNet normalisation of an H x W x 3 uint8 array."""
    tensor = torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1)
    return (tensor - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def _deterministic_config(size: int, **overrides) -> MultiCropConfig:
    """Every random step off and full-image crops: the views are just the normalised image."""
    settings = dict(
        global_size=size, local_size=size, n_local=2, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0),
        flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, global1_blur_p=0.0, global2_blur_p=0.0,
        local_blur_p=0.0, solarize_p=0.0,
    )
    return MultiCropConfig(**(settings | overrides))


def test_default_views_count_sizes_dtypes() -> None:
    torch.manual_seed(0)
    views = MultiCropAugmentation()(_photo())
    assert len(views) == 2 + 8
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8  # globals first
    assert all(v.dtype == torch.float32 for v in views)


def test_defaults_are_dino() -> None:
    config = MultiCropConfig()
    assert (config.global_scale, config.local_scale) == ((0.25, 1.0), (0.05, 0.25))
    assert (config.global1_blur_p, config.global2_blur_p, config.local_blur_p) == (1.0, 0.1, 0.5)
    assert (config.jitter, config.jitter_p, config.grayscale_p, config.solarize_p) == ((0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.2)
    assert (config.blur_kernel(224), config.blur_kernel(96), config.blur_kernel(32), config.blur_kernel(16)) == (23, 9, 3, 1)


def test_small_variant_sizes_and_overrides() -> None:
    config = MultiCropConfig.small(n_local=3)
    assert (config.global_size, config.local_size, config.n_local) == (32, 16, 3)
    assert config.local_blur_p == 0.0 and config.blur_sigma[1] <= 1.0
    torch.manual_seed(0)
    views = MultiCropAugmentation(config)(_photo(32, 32))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3


def test_same_torch_seed_same_views_whatever_python_and_numpy_state() -> None:
    augment = MultiCropAugmentation(MultiCropConfig.small(n_local=4))
    image = _photo(40, 40)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(123)
    first = augment(image)
    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(123)
    second = augment(image)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    torch.manual_seed(124)
    third = augment(image)
    assert not all(torch.equal(a, b) for a, b in zip(first, third))
    assert not torch.equal(first[2], first[3])  # each local view draws its own crop


def test_python_and_numpy_rng_untouched() -> None:
    augment = MultiCropAugmentation(MultiCropConfig(global_size=64, local_size=32, n_local=3))
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    for seed in range(5):
        augment(_photo(seed=seed))
    assert random.getstate() == python_state
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1]) and after[2:] == numpy_state[2:]
    assert not torch.equal(torch.get_rng_state(), torch_state)  # the randomness came from torch


def test_identity_recipe_gives_normalised_image() -> None:
    pixels = np.asarray(_photo(32, 32))
    views = MultiCropAugmentation(_deterministic_config(32))(Image.fromarray(pixels))
    for view in views:
        torch.testing.assert_close(view, _normalised(pixels), atol=1e-6, rtol=0)


def test_solarize_only_on_second_global() -> None:
    pixels = np.asarray(_photo(32, 32))
    views = MultiCropAugmentation(_deterministic_config(32, solarize_p=1.0))(Image.fromarray(pixels))
    solarized = np.where(pixels >= 128, 255 - pixels, pixels).astype(np.uint8)
    torch.testing.assert_close(views[1], _normalised(solarized), atol=1e-6, rtol=0)
    for index in (0, 2, 3):
        torch.testing.assert_close(views[index], _normalised(pixels), atol=1e-6, rtol=0)


@pytest.mark.parametrize("view_index, field", [(0, "global1_blur_p"), (1, "global2_blur_p"), (2, "local_blur_p")])
def test_blur_goes_to_its_own_view(view_index: int, field: str) -> None:
    """With one view's blur probability at 1, only that view is smoothed (less pixel-to-pixel variation)."""
    pixels = np.asarray(_photo(64, 64))
    views = MultiCropAugmentation(_deterministic_config(64, **{field: 1.0}))(Image.fromarray(pixels))
    plain = _normalised(pixels)

    def roughness(tensor: torch.Tensor) -> float:
        return tensor.diff(dim=2).abs().mean().item()

    for index, view in enumerate(views):
        if index == view_index or (view_index == 2 and index >= 2):
            assert roughness(view) < 0.8 * roughness(plain)
        else:
            torch.testing.assert_close(view, plain, atol=1e-6, rtol=0)


def test_views_use_bicubic_crops_with_their_scales_and_kernels() -> None:
    augment = MultiCropAugmentation()
    for pipeline, size, scale, kernel in (
        (augment.global1, 224, (0.25, 1.0), 23),
        (augment.global2, 224, (0.25, 1.0), 23),
        (augment.local, 96, (0.05, 0.25), 9),
    ):
        crop = pipeline.transforms[0]
        assert isinstance(crop, T.RandomResizedCrop)
        assert (crop.size, crop.scale, crop.interpolation) == ((size, size), scale, T.InterpolationMode.BICUBIC)
        blurs = [step.transforms[0] for step in pipeline.transforms
                 if isinstance(step, T.RandomApply) and isinstance(step.transforms[0], T.GaussianBlur)]
        assert [(b.kernel_size, b.sigma) for b in blurs] == [((kernel, kernel), (0.1, 2.0))]
