"""Backbone registry: short names (`r50`, `vit_s`, ...) to timm models, described by an `ArchSpec`.

An `ArchSpec` holds everything needed to rebuild a backbone whose state dict then loads strictly:
the trainer stores it inside its checkpoints, and the checkpoint loader infers it from foreign
state dicts. Backbones are always timm's `ResNet` / `VisionTransformer` (no hand-written networks),
built without a classifier (`num_classes=0`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mokd.core.errors import MokdError
from mokd.core.posembed import OfficialResizeViT

RESNET_LAYERS = {
    10: ((1, 1, 1, 1), False),
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}
STANDARD_WIDTHS = (64, 128, 256, 512)
VIT_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12), "large": (1024, 16)}


@dataclass(frozen=True)
class ArchSpec:
    """A backbone, fully described. `family` is "resnet" or "vit"; unused fields keep defaults."""

    name: str
    family: str
    img_size: int = 224
    # ResNet
    layers: tuple[int, ...] = ()
    bottleneck: bool = False
    widths: tuple[int, ...] = STANDARD_WIDTHS
    stem: str = "imagenet"  # "imagenet": 7x7/2 conv + maxpool; "cifar": 3x3/1 conv, no maxpool
    # ViT
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    patch_size: int = 16

    @property
    def is_vit(self) -> bool:
        return self.family == "vit"

    @property
    def feature_dim(self) -> int:
        """Size of the evaluation feature: pooled vector (ResNet) or CLS token (ViT)."""
        if self.is_vit:
            return self.embed_dim
        return self.widths[-1] * (4 if self.bottleneck else 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ArchSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise MokdError(f"architecture description has unknown fields {sorted(unknown)}")
        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**clean)

    def describe(self) -> str:
        """One line a researcher can check at a glance."""
        if self.is_vit:
            return (f"{self.name} (ViT, dim {self.embed_dim}, depth {self.depth}, heads {self.num_heads}, "
                    f"patch {self.patch_size}, position grid {self.img_size // self.patch_size}x"
                    f"{self.img_size // self.patch_size} = {self.img_size}px)")
        block = "Bottleneck" if self.bottleneck else "BasicBlock"
        widths = "" if self.widths == STANDARD_WIDTHS else f", widths {list(self.widths)}"
        return (f"{self.name} (ResNet, {block} {list(self.layers)}{widths}, {self.stem} stem)")


def _resnet(name: str, depth: int, **overrides: Any) -> ArchSpec:
    layers, bottleneck = RESNET_LAYERS[depth]
    return ArchSpec(name=name, family="resnet", layers=layers, bottleneck=bottleneck, **overrides)


def _vit(name: str, size: str, depth: int = 12, **overrides: Any) -> ArchSpec:
    dim, heads = VIT_SIZES[size]
    return ArchSpec(name=name, family="vit", embed_dim=dim, depth=depth, num_heads=heads, **overrides)


ALIASES: dict[str, ArchSpec] = {
    "r18": _resnet("r18", 18),
    "r34": _resnet("r34", 34),
    "r50": _resnet("r50", 50),
    "r101": _resnet("r101", 101),
    "r152": _resnet("r152", 152),
    "vit_t": _vit("vit_t", "tiny"),
    "vit_s": _vit("vit_s", "small"),
    "vit_b": _vit("vit_b", "base"),
    # A CPU-sized ResNet for tests and the demo: one BasicBlock per stage, quarter widths, CIFAR stem.
    "r_tiny": _resnet("r_tiny", 10, widths=(16, 32, 64, 128), stem="cifar", img_size=32),
    # The `tiny` recipe's ViT: ViT-T's width and heads with 4 blocks instead of 12, a third of the compute, so a
    # CPU demo affords the steps a ViT needs to learn anything (mokd_train/config.py, TINY_PRESET).
    "vit_mini": _vit("vit_mini", "tiny", depth=4, img_size=32, patch_size=4),
}
TIMM_NAMES = {
    "resnet18": "r18", "resnet34": "r34", "resnet50": "r50", "resnet101": "r101", "resnet152": "r152",
    "vit_tiny": "vit_t", "vit_small": "vit_s", "vit_base": "vit_b",  # DINO / official MOKD arch names
}


def resolve_arch(name: str, *, img_size: int | None = None, patch_size: int | None = None,
                 stem: str | None = None) -> ArchSpec:
    """Turn an alias (`r50`, `vit_s`), a DINO/MOKD arch name or a timm model name into an ArchSpec."""
    key = TIMM_NAMES.get(name, name)
    if key in ALIASES:
        spec = ALIASES[key]
    else:
        spec = _spec_from_timm_name(name)
    overrides: dict[str, Any] = {}
    if img_size is not None:
        overrides["img_size"] = img_size
    if patch_size is not None:
        if not spec.is_vit:
            raise MokdError(f"--patch-size applies to ViTs only, not {spec.name}")
        overrides["patch_size"] = patch_size
    if stem is not None:
        if spec.is_vit:
            raise MokdError(f"a stem variant applies to ResNets only, not {spec.name}")
        if stem not in ("imagenet", "cifar"):
            raise MokdError(f"unknown stem {stem!r}: use 'imagenet' or 'cifar'")
        overrides["stem"] = stem
    return dataclasses.replace(spec, **overrides) if overrides else spec


def _spec_from_timm_name(name: str) -> ArchSpec:
    """Describe a timm ResNet or ViT by building it once (no weights are downloaded)."""
    if name not in timm.list_models():
        known = ", ".join(ALIASES)
        raise MokdError(f"unknown architecture {name!r}: use one of {known} or a timm model name")
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    if isinstance(model, VisionTransformer):
        if model.cls_token is None or getattr(model, "num_reg_tokens", 0):
            raise MokdError(f"{name}: only ViTs with one class token and no register tokens are supported")
        patch = model.patch_embed.patch_size[0]
        grid = model.patch_embed.grid_size[0]
        return ArchSpec(name=name, family="vit", embed_dim=model.embed_dim, depth=len(model.blocks),
                        num_heads=model.blocks[0].attn.num_heads, patch_size=patch, img_size=patch * grid)
    if isinstance(model, ResNet) and type(model.conv1) is nn.Conv2d:
        stages = [model.layer1, model.layer2, model.layer3, model.layer4]
        bottleneck = isinstance(model.layer1[0], Bottleneck)
        first = [stage[0] for stage in stages]
        widths = tuple(block.conv1.out_channels for block in first)
        return ArchSpec(name=name, family="resnet", layers=tuple(len(s) for s in stages),
                        bottleneck=bottleneck, widths=widths)
    raise MokdError(f"{name}: only plain ResNets and ViTs are supported as backbones")


def build_backbone(spec: ArchSpec, *, drop_path_rate: float = 0.0, vit_init: bool = True) -> nn.Module:
    """A randomly initialised timm backbone for `spec`, with no classifier (`vit_init=False`: a ViT skips timm's
    weight init, for `meta_backbone`).

    A ViT accepts any input size that is a multiple of its patch: its position embedding keeps the grid of
    `spec.img_size` and is resized per forward exactly as the official DINO/MOKD code does (mokd.core.posembed)."""
    if spec.is_vit:
        return OfficialResizeViT(
            img_size=spec.img_size, patch_size=spec.patch_size, embed_dim=spec.embed_dim,
            depth=spec.depth, num_heads=spec.num_heads, mlp_ratio=4.0, qkv_bias=True,
            num_classes=0, global_pool="token", dynamic_img_size=True, drop_path_rate=drop_path_rate,
            weight_init="" if vit_init else "skip",
        )
    block = Bottleneck if spec.bottleneck else BasicBlock
    model = ResNet(block=block, layers=spec.layers, channels=spec.widths, num_classes=0,
                   drop_path_rate=drop_path_rate)
    if spec.stem == "cifar":
        stem_width = model.conv1.out_channels
        model.conv1 = nn.Conv2d(3, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def meta_backbone(spec: ArchSpec) -> nn.Module:
    """`spec`'s names and shapes on the meta device, nothing allocated. A ViT skips timm's weight init, which
    writes nothing to meta tensors yet costs about a quarter of a second in meta kernels."""
    with torch.device("meta"):
        return build_backbone(spec, vit_init=False)


def forward_tokens(backbone: nn.Module, spec: ArchSpec, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two outputs MOKD's heads need.

    Returns `(global_feature, local_features)`: for a ResNet the pooled vector (B×C) and the
    last feature map before pooling (B×C×h×w); for a ViT the CLS token and the patch tokens
    (B×N×D), both after the final LayerNorm.
    """
    features = backbone.forward_features(images)
    if spec.is_vit:
        return features[:, 0], features[:, 1:]
    return features.mean(dim=(2, 3)), features
