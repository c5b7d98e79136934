"""Architecture inference: the ResNet or ViT a backbone state dict was made from, read off tensor shapes.

Why: only mokd's own checkpoints store their architecture; for DINO, MoCo, official MOKD and plain state
dicts the shapes are the only record, and a strict load afterwards proves the guess right.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from mokd.core.errors import MokdError
from mokd.core.registry import ALIASES, ArchSpec

VIT_HEAD_DIM = 64  # assumed attention-head width of inferred ViTs: tiny/small/base all use 64


def _block_count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({name[len(prefix):].split(".", 1)[0] for name in state if name.startswith(prefix)})


def _pos_embed_grid(state: Mapping[str, torch.Tensor], where: str) -> int:
    """Side of the square patch grid the position embedding was trained for (one class token first)."""
    pos_embed = state["pos_embed"]
    tokens = pos_embed.shape[1] - 1 if pos_embed.ndim == 3 else -1
    grid = math.isqrt(tokens) if tokens > 0 else 0
    if grid * grid != tokens or grid == 0:
        raise MokdError(f"{where}: pos_embed of shape {list(pos_embed.shape)} is not one class token plus a "
                        "square patch grid; only square ViTs with a class token are supported")
    return grid


def _infer_resnet(state: Mapping[str, torch.Tensor], where: str) -> ArchSpec:
    bottleneck = "layer1.0.conv3.weight" in state
    layers = tuple(_block_count(state, f"layer{stage}.") for stage in range(1, 5))
    if 0 in layers:
        raise MokdError(f"{where}: ResNet with blocks per stage {list(layers)}: all four stages are required")
    first_convs = [state.get(f"layer{stage}.0.conv1.weight") for stage in range(1, 5)]
    if any(conv is None for conv in first_convs):
        raise MokdError(f"{where}: a ResNet stage has no block 0 (layerN.0.conv1.weight): the state dict is incomplete")
    widths = tuple(conv.shape[0] for conv in first_convs)
    stems = {7: "imagenet", 3: "cifar"}
    kernel = state["conv1.weight"].shape[-1]
    if kernel not in stems:
        raise MokdError(f"{where}: ResNet stem with a {kernel}x{kernel} conv1 is not supported (7x7 or 3x3)")
    stem = stems[kernel]
    for alias in ALIASES.values():
        if not alias.is_vit and (alias.layers, alias.bottleneck, alias.widths, alias.stem) == (
                layers, bottleneck, widths, stem):
            return alias
    return ArchSpec(name=f"resnet[{','.join(map(str, layers))}]", family="resnet", layers=layers,
                    bottleneck=bottleneck, widths=widths, stem=stem, img_size=32 if stem == "cifar" else 224)


def _assumed_heads(embed_dim: int) -> int:
    """State dicts do not store the head count: take the divisor of embed_dim whose head width is closest
    to 64 -- exactly embed_dim / 64 for tiny/small/base. `--model` overrides the guess."""
    divisors = [heads for heads in range(1, embed_dim + 1) if embed_dim % heads == 0]
    return min(divisors, key=lambda heads: abs(embed_dim / heads - VIT_HEAD_DIM))


def _infer_vit(state: Mapping[str, torch.Tensor], where: str) -> ArchSpec:
    if "fc_norm.weight" in state:
        raise MokdError(f"{where}: ViT with fc_norm (timm's average-pooled layout, e.g. fine-tuned MAE) has no final "
                        "norm for the class token; only class-token ViTs are supported")
    if "pos_embed" not in state:
        raise MokdError(f"{where}: ViT without pos_embed: cannot tell its image size")
    dim = state["cls_token"].shape[-1]
    depth = _block_count(state, "blocks.")
    kernel = state["patch_embed.proj.weight"].shape[-2:]
    if kernel[0] != kernel[1]:
        raise MokdError(f"{where}: non-square patches {list(kernel)} are not supported")
    patch = kernel[0]
    grid = _pos_embed_grid(state, where)
    for alias in ALIASES.values():
        if alias.is_vit and (alias.embed_dim, alias.depth, alias.patch_size) == (dim, depth, patch):
            return dataclasses.replace(alias, img_size=grid * patch)
    return ArchSpec(name=f"vit[dim={dim},depth={depth},patch={patch}]", family="vit", embed_dim=dim, depth=depth,
                    num_heads=_assumed_heads(dim), patch_size=patch, img_size=grid * patch)


def infer_arch(state: Mapping[str, torch.Tensor], *, where: str = "state dict") -> ArchSpec:
    """The ArchSpec a prefix-stripped backbone state dict was made from, read off tensor shapes.

    ViT heads cannot be read off tensors: they are assumed to be 64 wide (the tiny/small/base
    convention, see `_assumed_heads`); `--model` overrides that.
    """
    if "cls_token" in state and "patch_embed.proj.weight" in state:
        return _infer_vit(state, where)
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        return _infer_resnet(state, where)
    first = ", ".join(list(state)[:5])
    raise MokdError(f"{where}: unknown backbone layout (neither a ResNet nor a ViT); first tensors: {first}; "
                    "pick another model with --key")


def spec_to_build(spec: ArchSpec, state: Mapping[str, torch.Tensor], where: str) -> ArchSpec:
    """The spec to build: a ViT keeps the position-embedding grid of the file (no resampling on load)."""
    if spec.is_vit and "pos_embed" in state:
        return dataclasses.replace(spec, img_size=_pos_embed_grid(state, where) * spec.patch_size)
    return spec
