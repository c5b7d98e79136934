"""Registry: aliases resolve to the right timm backbones, and specs round-trip."""

import pytest
import torch

from mokd.core.errors import MokdError
from mokd.core.registry import ArchSpec, build_backbone, forward_tokens, meta_backbone, resolve_arch


@pytest.mark.parametrize("name, feature_dim, params_millions", [
    ("r18", 512, 11.18), ("r50", 2048, 23.51), ("vit_t", 192, 5.52), ("vit_s", 384, 21.67),
])
def test_aliases_build_the_published_backbones(name, feature_dim, params_millions):
    spec = resolve_arch(name)
    model = meta_backbone(spec)
    assert spec.feature_dim == feature_dim
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_millions, abs=0.01)


def test_dino_arch_names_and_timm_names_resolve():
    assert resolve_arch("resnet50") == resolve_arch("r50")
    assert resolve_arch("vit_small") == resolve_arch("vit_s")
    spec = resolve_arch("vit_small_patch8_224")
    assert (spec.embed_dim, spec.depth, spec.num_heads, spec.patch_size, spec.img_size) == (384, 12, 6, 8, 224)
    assert resolve_arch("resnet26").layers == (2, 2, 2, 2)


def test_unknown_arch_and_bad_overrides_are_user_errors():
    with pytest.raises(MokdError, match="unknown architecture"):
        resolve_arch("resnet_9000")
    with pytest.raises(MokdError, match="ViTs only"):
        resolve_arch("r18", patch_size=4)
    with pytest.raises(MokdError, match="unknown stem"):
        resolve_arch("r18", stem="weird")


def test_spec_round_trips_through_a_plain_dict():
    spec = resolve_arch("vit_t", img_size=32, patch_size=4)
    assert ArchSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(MokdError, match="unknown fields"):
        ArchSpec.from_dict({**spec.to_dict(), "colour": "red"})


def test_forward_tokens_shapes_for_global_and_local_crops():
    torch.manual_seed(0)
    vit = resolve_arch("vit_t", img_size=32, patch_size=4)
    model = build_backbone(vit).eval()
    cls, patches = forward_tokens(model, vit, torch.randn(2, 3, 16, 16))
    assert cls.shape == (2, 192) and patches.shape == (2, 16, 192)
    cnn = resolve_arch("r_tiny")
    model = build_backbone(cnn).eval()
    images = torch.randn(2, 3, 32, 32)
    pooled, fmap = forward_tokens(model, cnn, images)
    assert fmap.shape == (2, 128, 4, 4)
    assert torch.allclose(pooled, model(images), atol=1e-6)


def test_vit_global_feature_equals_the_timm_forward():
    torch.manual_seed(0)
    vit = resolve_arch("vit_t", img_size=32, patch_size=4)
    model = build_backbone(vit).eval()
    images = torch.randn(2, 3, 32, 32)
    cls, _ = forward_tokens(model, vit, images)
    assert torch.allclose(cls, model(images), atol=1e-6)


def test_vit_mini_is_vit_t_with_four_blocks():
    """The tiny recipe's ViT: ViT-T's width (192) and heads (3), 4 blocks; its parameter count against the
    closed form of a timm ViT without classifier at 32 px with 4-px patches (64 patches + CLS)."""
    spec = resolve_arch("vit_mini")
    assert (spec.embed_dim, spec.num_heads, spec.depth, spec.patch_size, spec.img_size) == (192, 3, 4, 4, 32)
    dim, hidden, patches = 192, 4 * 192, (32 // 4) ** 2
    block = 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + 2 * dim + (dim * hidden + hidden) + (hidden * dim + dim)
    embed = (3 * 4 * 4 * dim + dim) + dim + (patches + 1) * dim
    model = build_backbone(spec)
    assert sum(p.numel() for p in model.parameters()) == embed + 4 * block + 2 * dim
    assert len(model.blocks) == 4
