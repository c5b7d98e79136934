"""Position embeddings are resized exactly as the official DINO/MOKD code does (bicubic by scale factor, +0.1)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from mokd.core.posembed import resize_grid_embedding, resize_with_prefix
from mokd.core.registry import ArchSpec, build_backbone
from mokd_train.heads import THead


def official_interpolate(pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The official rule written out again: class token first, square grid, scale factor with +0.1."""
    class_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    if n == h * w and h == w:
        return pos_embed
    side = int(math.sqrt(n))
    h0, w0 = h + 0.1, w + 0.1
    patch_pos = F.interpolate(patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2),
                              scale_factor=(h0 / math.sqrt(n), w0 / math.sqrt(n)), mode="bicubic")
    assert int(h0) == patch_pos.shape[-2] and int(w0) == patch_pos.shape[-1]
    return torch.cat([class_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def keys_cubic_resize_1d(values: np.ndarray, out_size: int, scale: float) -> np.ndarray:
    """Closed form of 1-d bicubic resizing by `scale` (Keys kernel, A = -0.75, half-pixel centres, edge clamp)."""
    a = -0.75

    def weight(d: float) -> float:
        d = abs(d)
        if d <= 1:
            return ((a + 2) * d - (a + 3)) * d * d + 1
        if d < 2:
            return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return 0.0

    out = np.zeros((out_size,) + values.shape[1:])
    for i in range(out_size):
        source = (i + 0.5) / scale - 0.5  # the given factor, not in/out sizes, sets the coordinates
        base = math.floor(source)
        for tap in range(base - 1, base + 3):
            out[i] += weight(source - tap) * values[min(max(tap, 0), len(values) - 1)]
    return out


@pytest.mark.parametrize("side,target", [(14, 6), (4, 2), (3, 7), (8, 4), (2, 5)])
def test_resize_equals_separable_closed_form(side, target):
    torch.manual_seed(0)
    grid = torch.randn(1, side * side, 3, dtype=torch.float64)
    got = resize_grid_embedding(grid, target, target).reshape(target, target, 3).numpy()
    scale = (target + 0.1) / side
    rows = keys_cubic_resize_1d(grid.reshape(side, side, 3).numpy(), target, scale)
    expected = keys_cubic_resize_1d(rows.transpose(1, 0, 2), target, scale).transpose(1, 0, 2)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_constant_grid_stays_constant_and_same_square_grid_is_untouched():
    grid = torch.full((1, 16, 5), 0.25, dtype=torch.float64)
    torch.testing.assert_close(resize_grid_embedding(grid, 3, 3), torch.full((1, 9, 5), 0.25, dtype=torch.float64))
    same = torch.randn(1, 16, 5)
    assert resize_grid_embedding(same, 4, 4) is same
    with pytest.raises(ValueError, match="not a square grid"):
        resize_grid_embedding(torch.randn(1, 15, 5), 2, 2)


def test_differs_from_resizing_to_a_size():
    """Why the rule matters: timm's size-based resample gives other values (measured ~1e-1 here)."""
    torch.manual_seed(0)
    pos_embed = torch.randn(1, 1 + 14 * 14, 8)
    ours = resize_with_prefix(pos_embed, 1, 6, 6)
    timm_values = resample_abs_pos_embed(pos_embed, new_size=[6, 6], old_size=[14, 14], num_prefix_tokens=1,
                                         interpolation="bicubic", antialias=False)
    torch.testing.assert_close(ours, official_interpolate(pos_embed, 6, 6), rtol=0, atol=0)
    assert (ours - timm_values).abs().max() > 1e-2


@pytest.mark.parametrize("image", [16, 8, 32])
def test_vit_backbone_adds_the_official_embedding_at_any_input_size(image):
    spec = ArchSpec(name="t", family="vit", img_size=16, embed_dim=12, depth=1, num_heads=2, patch_size=4)
    torch.manual_seed(0)
    vit = build_backbone(spec).eval()
    torch.nn.init.normal_(vit.pos_embed)
    tokens = vit.patch_embed(torch.randn(2, 3, image, image))
    expected = torch.cat([vit.cls_token.expand(2, -1, -1), tokens.flatten(1, 2)], dim=1)
    expected = expected + official_interpolate(vit.pos_embed, image // 4, image // 4)
    torch.testing.assert_close(vit._pos_embed(tokens), expected, rtol=0, atol=0)


def test_thead_tokens_use_the_official_resize():
    torch.manual_seed(0)
    head = THead(6, 12, 32, grid=7, conv_input=True, depth=1, num_heads=2)
    feature_map = torch.randn(2, 6, 3, 3)
    tokens, _ = head.tokens(feature_map)
    projected = head.patch_embed(feature_map).flatten(2).transpose(1, 2)
    with_cls_slot = torch.cat([torch.zeros(1, 1, 12), head.pos_embed], dim=1)
    expected = projected + official_interpolate(with_cls_slot, 3, 3)[:, 1:]
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
