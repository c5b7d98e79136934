"""Projection heads of a MOKD network: the DINO MLP-Head and the Transformer T-Head.

Parameter names follow the official MOKD layout (`mlp.0`, `last_layer.weight_g`, `pos_embed`,
`patch_embed`, `blocks.N`, `norm`), so exporting a checkpoint to the official format is a prefix mapping.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from mokd.core.posembed import resize_grid_embedding

INIT_STD = 0.02


def _init_linear(module: nn.Module) -> None:
    """DINO/ViT initialisation: truncated normal weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class _WeightNormLinearFunction(torch.autograd.Function):
    """y = (x @ v.T) * (g / ||v||).T with a hand-written backward.

    Equal to `F.linear(x, v * g / ||v||)`, but neither direction materialises a K×D temporary besides the
    gradient of v itself (autograd's version allocates the scaled weight, then a product and a quotient in
    the norm's backward). At K = 65,536 each such temporary is 100 MB, and on CPU each fresh allocation of
    that size costs more page faults than the arithmetic: 27 % of a R50-ViT-S step before this function.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        norm = v.norm(dim=1)
        projected = F.linear(x, v)
        ctx.save_for_backward(x, v, g, norm, projected)
        return projected * (g.squeeze(1) / norm)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, v, g, norm, projected = ctx.saved_tensors
        g = g.squeeze(1)
        grad_projected = grad_output * (g / norm)
        grad_x = grad_v = grad_g = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_projected.matmul(v.to(grad_projected.dtype))
        # d/d(g/||v||) of the loss, per output row: sum over the batch of grad_output * (x @ v.T).
        row_grad = (grad_output * projected).flatten(0, -2).sum(dim=0)
        if ctx.needs_input_grad[1]:
            grad_v = grad_projected.flatten(0, -2).t().matmul(x.flatten(0, -2).to(grad_projected.dtype))
            grad_v = grad_v.to(v.dtype).addcmul_(v, (-row_grad * g / norm ** 3).unsqueeze(1).to(v.dtype))
        if ctx.needs_input_grad[2]:
            grad_g = (row_grad / norm).unsqueeze(1).to(g.dtype)
        return grad_x, grad_v, grad_g


class WeightNormLinear(nn.Module):
    """Bias-free Linear whose weight rows are `g * v / ||v||`.

    Our own module (not `torch.nn.utils.weight_norm`) so the parameters are plainly named
    `weight_g` (out×1) and `weight_v` (out×in), exactly as in official checkpoints.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        nn.init.trunc_normal_(self.weight_v, std=INIT_STD)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _WeightNormLinearFunction.apply(x, self.weight_v, self.weight_g)


class MLPHead(nn.Module):
    """DINO head: 3-layer MLP, L2-normalised bottleneck, weight-normalised projection to K logits.

    `norm_last_layer` freezes `weight_g` at 1 (the official code does so for CNN students only).
    `use_bn` adds BatchNorm after both hidden layers (DINO's `use_bn` option, off in the official MOKD
    recipe): it standardises the hidden features over the batch, so a backbone whose features barely differ
    between images at initialisation still gives the teacher diverse targets (what a short run needs).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True, use_bn: bool = False) -> None:
        super().__init__()

        def hidden(width_in: int) -> list[nn.Module]:
            # A bias before BatchNorm is cancelled by its mean subtraction: left out, it cannot drift on the
            # rounding noise of its (analytically zero) gradient, which AdamW would scale up to full steps.
            norm = [nn.BatchNorm1d(hidden_dim)] if use_bn else []
            return [nn.Linear(width_in, hidden_dim, bias=not use_bn), *norm, nn.GELU()]

        self.mlp = nn.Sequential(*hidden(in_dim), *hidden(hidden_dim), nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class THead(nn.Module):
    """MOKD's Transformer head over a backbone's local features (CNN feature map or ViT patch grid).

    Input is always a B×C×h×w map. A CNN map goes through a 1×1 conv (`patch_embed`); ViT tokens
    through `input_proj` only when their width differs from the head's (not in the official layout).
    The learnable position embedding (no CLS slot) is resized to any other grid, e.g. the smaller grid of
    local crops, exactly as the official code does (bicubic by scale factor with the +0.1 offset,
    `mokd.core.posembed`). An optional query token is prepended without
    position embedding and dropped after the final norm: that is the cross-attention feature search.
    `l2_normalize` normalises the pooled tokens before the last layer, as the MLP-Head does with its bottleneck;
    the official T-Head does not (off by default). In the `tiny` recipe the unnormalised self term `st` collapsed a
    4-block ViT's patch tokens (README, demo section).
    """

    def __init__(self, in_dim: int, dim: int, out_dim: int, grid: int, *, conv_input: bool,
                 depth: int = 3, num_heads: int = 6, l2_normalize: bool = False) -> None:
        super().__init__()
        self.grid = grid
        self.l2_normalize = l2_normalize
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        self.patch_embed = nn.Conv2d(in_dim, dim, kernel_size=1) if conv_input else None
        self.input_proj = nn.Linear(in_dim, dim) if not conv_input and in_dim != dim else None
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth))
        self.norm = norm_layer(dim)
        self.apply(_init_linear)
        self.last_layer = WeightNormLinear(dim, out_dim)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map ViT features (…×C) to the head's width; identity when widths already match."""
        return tokens if self.input_proj is None else self.input_proj(tokens)

    def tokens(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(tokens with position embedding B×N×D, mean of the projected tokens B×D)`.

        The mean (taken before the position embedding) is the CNN's search query `x_pool`.
        """
        height, width = feature_map.shape[-2:]
        if self.patch_embed is not None:
            feature_map = self.patch_embed(feature_map)
        projected = self.project(feature_map.flatten(2).transpose(1, 2))
        pos_embed = resize_grid_embedding(self.pos_embed, height, width)
        return projected + pos_embed, projected.mean(dim=1)

    def encode(self, tokens: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B×K) from prepared tokens; `query` (B×D) joins the attention but not the pooling."""
        return self.last_layer(self.pooled(tokens, query))

    def search(self, tokens: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """`encode` of each image's tokens (B×N×D) with each of its L queries (L·B×D, view-major): L·B×K."""
        return self.last_layer(self.search_pooled(tokens, queries))

    def pooled(self, tokens: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """`encode` before the last layer (B×D): callers that need several encodings of one head concatenate
        them and apply `last_layer` once."""
        x = tokens if query is None else torch.cat([query.unsqueeze(1), tokens], dim=1)
        return self._blocks_and_pool(x, query is not None)

    def search_pooled(self, tokens: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """`search` before the last layer. Equal to `pooled(tokens.repeat(L, 1, 1), queries)`, but the tokens
        are broadcast into the one query-token concatenation instead of being materialised L times first."""
        batch, count, dim = tokens.shape
        n_queries = queries.shape[0] // batch
        x = torch.cat([queries.view(n_queries, batch, 1, dim), tokens.unsqueeze(0).expand(n_queries, -1, -1, -1)],
                      dim=2)
        return self._blocks_and_pool(x.view(n_queries * batch, count + 1, dim), True)

    def _blocks_and_pool(self, x: torch.Tensor, has_query: bool) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if has_query:
            x = x[:, 1:]
        pooled = x.mean(dim=1)
        return F.normalize(pooled, dim=-1) if self.l2_normalize else pooled

    def forward(self, feature_map: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(self.tokens(feature_map)[0], query)
