"""Mean attention distance (ViT paper, App. D.7; MOKD Fig. 5/S2), for ViTs and, by self-attention on feature
maps, for ResNets.

MAD[l, h] = (1/N) sum_i sum_j A[i, j] d(i, j) over the N patch queries i and patch keys j of layer l, head h,
with d the pixel distance between patch centres, then the mean over images. Only patch rows and columns are
used; by default the sliced rows are not renormalised (mass on the class token counts as distance 0, as public
implementations do). Every layer of a ViT comes from ONE forward pass: a hook on each block's qkv projection
rebuilds that block's softmax(q k^T / sqrt(d)) while the model itself keeps its fused attention kernel.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mokd.core.errors import MokdError

# Bound on the attention matrices the CNN variant builds at once (elements): res2 at 224 px is 3136^2 per image.
CNN_ATTENTION_ELEMENTS = 2**26


@functools.lru_cache(maxsize=32)
def patch_distances(grid: tuple[int, int], patch: float) -> torch.Tensor:
    """N x N pixel distances between the centres of a row-major grid of patches (N = rows * cols); cached."""
    rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    return torch.from_numpy(np.hypot(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :]) * patch)


def mean_attention_distance(attention: torch.Tensor, grid: tuple[int, int], patch: float, *,
                            prefix_tokens: int = 1, renormalize: bool = False) -> torch.Tensor:
    """MAD in pixels per image and head, shape (B, H), of attention (B, H, T, T) with T = prefix + rows * cols.

    `renormalize=True` rescales each sliced patch row to sum 1; a row without any mass on patches (all of it on
    the class token) makes that undefined and is refused.
    """
    if attention.ndim != 4 or attention.shape[-1] != attention.shape[-2]:
        raise MokdError(f"attention must be B x H x T x T, got shape {tuple(attention.shape)}")
    n_patches = grid[0] * grid[1]
    if attention.shape[-1] != prefix_tokens + n_patches:
        raise MokdError(f"attention has {attention.shape[-1]} tokens but {prefix_tokens} prefix tokens + a "
                        f"{grid[0]}x{grid[1]} grid make {prefix_tokens + n_patches}")
    patches = attention[..., prefix_tokens:, prefix_tokens:].double()  # float32 sums would drift by ~1e-4 px
    if renormalize:
        mass = patches.sum(dim=-1, keepdim=True)
        if bool((mass <= 0).any()):
            raise MokdError("a query puts no attention on any patch (all on the class token): the renormalised "
                            "mean attention distance is undefined; measure without renormalize")
        patches = patches / mass
    distances = patch_distances(grid, patch).to(patches.device)
    return torch.einsum("bhij,ij->bh", patches, distances) / n_patches  # sum_i sum_j A[i, j] d(i, j), then / N


# --- ViT: all layers in one forward pass ------------------------------------------------------------------------


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise MokdError(f"{type(model).__name__} has no transformer blocks: attention needs a ViT")
    modules = [getattr(block, "attn", None) for block in blocks]
    for attn in modules:
        if attn is None or not all(hasattr(attn, name) for name in ("fused_attn", "attn_drop", "num_heads")):
            raise MokdError("only timm ViT blocks with timm's Attention (fused_attn, attn_drop) can be measured")
    return modules


@contextmanager
def record_attention(model: nn.Module, on_attention: Callable[[int, torch.Tensor], None],
                     layers: Sequence[int] | None = None) -> Iterator[None]:
    """While active, every forward of `model` calls `on_attention(layer, A)` for each (0-based) block layer,
    A = B x heads x T x T, the block's own softmax(q k^T * scale) of that same forward.

    timm's Attention computes that matrix explicitly (and passes it through `attn_drop`) when its fused kernel is
    off; it is switched off for the recorded blocks only, and restored afterwards.
    """
    modules = _attention_modules(model)
    wanted = list(range(len(modules)) if layers is None else layers)
    handles, fused = [], {}
    seen: set[int] = set()
    for layer in wanted:
        attn = modules[layer]
        fused[layer] = attn.fused_attn
        attn.fused_attn = False

        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor, layer: int = layer) -> None:
            seen.add(layer)
            on_attention(layer, output)

        handles.append(attn.attn_drop.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, value in fused.items():
            modules[layer].fused_attn = value
    if seen and seen != set(wanted):
        raise MokdError(f"attention of layers {sorted(set(wanted) - seen)} was not observed: this ViT's attention "
                        "does not expose its weights")


class ViTDistance:
    """Accumulates MAD[layer, head] (pixels) over batches, all layers from one forward per batch."""

    def __init__(self, model: nn.Module, patch: int, *, renormalize: bool = False) -> None:
        self.model = model
        self.patch = patch
        self.renormalize = renormalize
        self.prefix = int(getattr(model, "num_prefix_tokens", 1))
        modules = _attention_modules(model)
        self.sums = np.zeros((len(modules), modules[0].num_heads))
        self.images = 0

    def add(self, images: torch.Tensor) -> None:
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)

        def accumulate(layer: int, attention: torch.Tensor) -> None:
            values = mean_attention_distance(attention, grid, self.patch, prefix_tokens=self.prefix,
                                             renormalize=self.renormalize)
            self.sums[layer] += values.sum(dim=0).cpu().numpy()

        with record_attention(self.model, accumulate), torch.inference_mode():
            self.model(images)
        self.images += len(images)

    def result(self) -> np.ndarray:
        return self.sums / max(self.images, 1)


# --- ResNet: self-attention on feature maps ---------------------------------------------------------------------


def feature_map_attention(features: torch.Tensor) -> torch.Tensor:
    """B x 1 x N x N attention of a B x C x H x W map: q = k = channel LayerNorm (no affine), softmax(q k^T / sqrt(C))."""
    channels = features.shape[1]
    tokens = F.layer_norm(features.flatten(2).transpose(1, 2).double(), (channels,))
    return (tokens @ tokens.transpose(1, 2) / math.sqrt(channels)).softmax(dim=-1).unsqueeze(1)


def feature_map_distance(features: torch.Tensor, stride: float) -> torch.Tensor:
    """MAD in pixels per image, shape (B,), of a B x C x H x W stage output whose positions are `stride` px apart."""
    height, width = features.shape[-2:]
    chunk = max(1, CNN_ATTENTION_ELEMENTS // (height * width) ** 2)
    values = [mean_attention_distance(feature_map_attention(features[start:start + chunk]), (height, width), stride,
                                      prefix_tokens=0)[:, 0] for start in range(0, len(features), chunk)]
    return torch.cat(values)


def resnet_points(model: nn.Module, per_block: bool) -> list[tuple[str, nn.Module]]:
    """Named modules whose outputs are measured: the four stages, or every residual block."""
    stages = [(f"res{index + 2}", getattr(model, f"layer{index + 1}", None)) for index in range(4)]
    if any(stage is None for _, stage in stages):
        raise MokdError(f"{type(model).__name__} is not a ResNet with layer1..layer4")
    if not per_block:
        return stages
    return [(f"{name}.{index}", block) for name, stage in stages for index, block in enumerate(stage)]


class CNNDistance:
    """Accumulates the feature-map attention distance (pixels) per ResNet stage or block over batches."""

    def __init__(self, model: nn.Module, *, per_block: bool = False) -> None:
        self.model = model
        self.points = resnet_points(model, per_block)
        self.sums = np.zeros((len(self.points), 1))
        self.images = 0

    def add(self, images: torch.Tensor) -> None:
        image_height = images.shape[-2]
        handles = []
        for index, (_, module) in enumerate(self.points):
            def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor, index: int = index) -> None:
                stride = image_height / output.shape[-2]
                self.sums[index, 0] += float(feature_map_distance(output.float(), stride).sum())

            handles.append(module.register_forward_hook(hook))
        try:
            with torch.inference_mode():
                self.model(images)
        finally:
            for handle in handles:
                handle.remove()
        self.images += len(images)

    def result(self) -> np.ndarray:
        return self.sums / max(self.images, 1)
