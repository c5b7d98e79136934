"""Mean attention distance: the spec's closed-form values, the CNN variant, and one pass == layer by layer."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from mokd_analysis.attention_distance import (CNNDistance, ViTDistance, feature_map_attention, feature_map_distance,
                                         mean_attention_distance, record_attention)
from mokd.core.errors import MokdError
from mokd.core.registry import ALIASES, build_backbone


def patch_attention(grid: int, prefix: int, fill) -> torch.Tensor:
    """1 x 1 x T x T attention with the patch block filled by `fill(grid)` (an N x N tensor)."""
    tokens = prefix + grid * grid
    attention = torch.zeros(1, 1, tokens, tokens, dtype=torch.float64)
    attention[0, 0, prefix:, prefix:] = fill(grid)
    return attention


def uniform(grid: int) -> torch.Tensor:
    return torch.full((grid * grid, grid * grid), 1.0 / (grid * grid), dtype=torch.float64)


def reflect(position: int, step: int, size: int) -> int:
    """position + step, or position - step where that would leave the grid (the offset is mirrored)."""
    return position + step if 0 <= position + step < size else position - step


def offset(dx: int, dy: int):
    def fill(grid: int) -> torch.Tensor:
        block = torch.zeros(grid * grid, grid * grid, dtype=torch.float64)
        for r in range(grid):
            for c in range(grid):
                block[r * grid + c, reflect(r, dy, grid) * grid + reflect(c, dx, grid)] = 1.0
        return block
    return fill


@pytest.mark.parametrize("grid, patch, expected", [(14, 16, 116.4922), (28, 8, 116.7216), (7, 32, 115.5029)])
def test_uniform_attention_over_patches(grid, patch, expected):
    value = mean_attention_distance(patch_attention(grid, 1, uniform), (grid, grid), patch)
    assert float(value) == pytest.approx(expected, abs=5e-5)


def test_uniform_over_all_tokens_keeps_the_cls_mass_as_distance_zero():
    attention = torch.full((1, 1, 197, 197), 1.0 / 197, dtype=torch.float64)
    assert float(mean_attention_distance(attention, (14, 14), 16)) == pytest.approx(115.9009, abs=5e-5)
    assert float(mean_attention_distance(attention, (14, 14), 16)) == pytest.approx(116.49222 * 196 / 197, abs=5e-4)
    renormalised = mean_attention_distance(attention, (14, 14), 16, renormalize=True)
    assert float(renormalised) == pytest.approx(116.4922, abs=5e-5)


def test_identity_attention_is_zero():
    identity = patch_attention(14, 1, lambda g: torch.eye(g * g, dtype=torch.float64))
    assert float(mean_attention_distance(identity, (14, 14), 16)) == 0.0


@pytest.mark.parametrize("dx, dy, expected", [(1, 0, 16.0), (1, 2, 35.7771), (3, 4, 80.0)])
def test_fixed_offset_with_reflection_at_the_border(dx, dy, expected):
    value = mean_attention_distance(patch_attention(14, 1, offset(dx, dy)), (14, 14), 16)
    assert float(value) == pytest.approx(expected, abs=5e-5)
    assert expected == pytest.approx(16 * math.hypot(dx, dy), abs=5e-5)


def test_all_mass_on_cls_is_zero_and_renormalising_it_is_refused():
    attention = torch.zeros(1, 1, 197, 197, dtype=torch.float64)
    attention[..., 0] = 1.0
    assert float(mean_attention_distance(attention, (14, 14), 16)) == 0.0
    with pytest.raises(MokdError, match="undefined"):
        mean_attention_distance(attention, (14, 14), 16, renormalize=True)


def test_two_class_tokens_and_several_heads_and_images():
    attention = torch.zeros(2, 3, 2 + 49, 2 + 49, dtype=torch.float64)
    attention[..., 2:, 2:] = uniform(7)
    attention[1, 2, 2:, 2:] = torch.eye(49)
    values = mean_attention_distance(attention, (7, 7), 32, prefix_tokens=2)
    assert values.shape == (2, 3)
    assert float(values[0, 0]) == pytest.approx(115.5029, abs=5e-5)
    assert float(values[1, 2]) == 0.0


def test_a_token_count_that_does_not_fit_the_grid_is_refused():
    with pytest.raises(MokdError, match="tokens"):
        mean_attention_distance(torch.zeros(1, 1, 50, 50), (7, 7), 16, prefix_tokens=2)


# --- CNN variant ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, stride, expected", [
    pytest.param(56, 4, 116.78, marks=pytest.mark.slow),  # 3,136 tokens: a float64 attention of 79 MB per image
    (28, 8, 116.72), (14, 16, 116.49), (7, 32, 115.50)])
def test_cnn_uniform_per_stage(size, stride, expected):
    constant = torch.randn(1, 16, 1, 1).expand(2, 16, size, size)  # identical features everywhere: uniform attention
    values = feature_map_distance(constant, stride)
    assert values.shape == (2,)
    assert values.tolist() == pytest.approx([expected, expected], abs=5e-3)


@pytest.mark.parametrize("size, stride", [(14, 16), (7, 32)])
def test_cnn_identity_per_stage(size, stride):
    channels = 2048  # one-hot features: self logit sqrt(C) = 45, others about -1/45
    features = torch.zeros(1, channels, size, size)
    for position in range(size * size):
        features[0, position, position // size, position % size] = 1.0
    attention = feature_map_attention(features)
    assert torch.allclose(attention[0, 0], torch.eye(size * size, dtype=torch.float64), atol=1e-15)
    assert float(feature_map_distance(features, stride)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("size, stride", [(56, 4), (28, 8), (14, 16), (7, 32)])
def test_cnn_fixed_offset_per_stage(size, stride):
    # q = k makes self-attention maximal, so a pure offset pattern is checked on the distance part directly.
    value = mean_attention_distance(patch_attention(size, 0, offset(1, 2)), (size, size), stride, prefix_tokens=0)
    assert float(value) == pytest.approx(stride * math.sqrt(5), abs=1e-6)


def test_cnn_meter_hooks_every_stage_with_its_stride():
    model = build_backbone(ALIASES["r_tiny"]).eval()  # CIFAR stem: strides 1, 2, 4, 8 at 32 px
    images = torch.randn(2, 3, 32, 32)
    maps = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: maps.__setitem__(name, o))
    meter = CNNDistance(model)
    meter.add(images)
    expected = [float(feature_map_distance(maps[name], 32 / maps[name].shape[-1]).mean())
                for name in ("layer1", "layer2", "layer3", "layer4")]
    assert meter.result()[:, 0].tolist() == pytest.approx(expected, rel=1e-9)
    assert [32 // maps[n].shape[-1] for n in ("layer1", "layer2", "layer3", "layer4")] == [1, 2, 4, 8]
    assert len(CNNDistance(model, per_block=True).points) == 4  # r_tiny has one block per stage


# --- ViT: one pass == layer by layer -------------------------------------------------------------------------------


def small_vit() -> nn.Module:
    spec = dataclasses.replace(ALIASES["vit_t"], embed_dim=48, depth=4, num_heads=3, patch_size=8, img_size=32)
    torch.manual_seed(0)
    return build_backbone(spec).eval()


def layer_by_layer_attention(model: nn.Module, images: torch.Tensor, layer: int) -> torch.Tensor:
    """DINO get_selfattention style: run the blocks before `layer`, then that block's attention by hand."""
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for block in model.blocks[:layer]:
            x = block(x)
        block = model.blocks[layer]
        y = block.norm1(x)
        batch, tokens, dim = y.shape
        heads = block.attn.num_heads
        qkv = block.attn.qkv(y).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // heads), dim=-1)


def test_one_pass_hooks_match_a_layer_by_layer_computation():
    model = small_vit()
    images = torch.randn(3, 3, 32, 32)
    captured = {}
    with record_attention(model, lambda layer, attention: captured.__setitem__(layer, attention)), torch.no_grad():
        model(images)
    assert sorted(captured) == [0, 1, 2, 3]
    meter = ViTDistance(model, patch=8)
    meter.add(images)
    for layer in range(4):
        reference = layer_by_layer_attention(model, images, layer)
        assert torch.allclose(captured[layer], reference, atol=1e-6)
        expected = mean_attention_distance(reference, (4, 4), 8).mean(dim=0).numpy()
        assert meter.result()[layer] == pytest.approx(expected, abs=1e-5)
    assert meter.result().shape == (4, 3)


def test_hooks_leave_the_model_output_unchanged_and_are_removed():
    model = small_vit()
    images = torch.randn(2, 3, 32, 32)
    fused = [block.attn.fused_attn for block in model.blocks]
    with torch.no_grad():
        before = model(images)
        with record_attention(model, lambda layer, attention: None):
            during = model(images)
    assert torch.allclose(before, during, atol=1e-5)  # explicit instead of fused attention: same up to rounding
    assert all(not block.attn.attn_drop._forward_hooks for block in model.blocks)
    assert all(block.attn.fused_attn == before_fused for block, before_fused in zip(model.blocks, fused))


def test_a_resnet_is_refused_by_the_vit_hooks():
    with pytest.raises(MokdError, match="ViT"):
        ViTDistance(build_backbone(ALIASES["r_tiny"]), patch=16)
