"""Position embeddings resized for another patch grid exactly as the official DINO and MOKD code does.

Rule (DINO's `interpolate_pos_encoding`, reused by both MOKD T-Heads): view the stored square grid as
1×D×√N×√N and call bicubic `interpolate` with `scale_factor = ((h + 0.1)/√N, (w + 0.1)/√N)` for a target
grid h×w (the +0.1 keeps floor(√N · scale) from landing one short, DINO issue 8), default align_corners, no
antialias; nothing changes when the token count already matches and the target is square. Passing a scale
factor rather than a size matters: the source coordinates are then computed from that (slightly larger)
factor, so the values differ from `interpolate(size=...)` and from timm's `resample_abs_pos_embed`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

OFFSET = 0.1


def resize_grid_embedding(pos_embed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`pos_embed` (1×N×D, a square grid, no prefix tokens) resized to height×width tokens (1×(h·w)×D)."""
    tokens, dim = pos_embed.shape[1], pos_embed.shape[2]
    if tokens == height * width and height == width:
        return pos_embed
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"position embedding of {tokens} tokens is not a square grid")
    grid = pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, scale_factor=((height + OFFSET) / side, (width + OFFSET) / side), mode="bicubic")
    if resized.shape[-2:] != (height, width):
        raise ValueError(f"resizing a {side}x{side} grid gave {tuple(resized.shape[-2:])}, not {(height, width)}")
    return resized.permute(0, 2, 3, 1).reshape(1, height * width, dim)


def resize_with_prefix(pos_embed: torch.Tensor, prefix: int, height: int, width: int) -> torch.Tensor:
    """Like `resize_grid_embedding` for an embedding whose first `prefix` entries (class token) are not a grid."""
    if pos_embed.shape[1] - prefix == height * width and height == width:
        return pos_embed
    return torch.cat([pos_embed[:, :prefix], resize_grid_embedding(pos_embed[:, prefix:], height, width)], dim=1)


class OfficialResizeViT(VisionTransformer):
    """timm's ViT whose position embedding follows inputs of any size by the official resize (above).

    Same parameters and state-dict names as `VisionTransformer`; only `_pos_embed` differs, and only for
    the plain layout the registry builds (one class token, embedding over class token and grid).
    """

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic_img_size or self.no_embed_class or self.reg_token is not None or self.cls_token is None:
            return super()._pos_embed(x)
        batch, height, width, dim = x.shape
        pos_embed = resize_with_prefix(self.pos_embed, self.num_prefix_tokens, height, width)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x.view(batch, -1, dim)], dim=1)
        return self.pos_drop(x + pos_embed)
