"""Benchmark the analyses against their references, measured in the same run.

1. Mean attention distance of a ViT-S/16 at 224 px over N images: mokd's one forward pass with hooks on every
   block versus a DINO `get_selfattention`-style loop (one forward up to each layer, 12 forwards), same model and
   images; the values must be identical.
2. t-SNE of 5,000 x 384 features end to end (normalise, embed, align, plot) against the 30 s target.

Usage: python benchmarks/bench_analysis.py [--images 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mokd_analysis.attention_distance import ViTDistance, mean_attention_distance
from mokd_analysis.tsne import aligned_embeddings, embed, engine_name, plot_tsne
from mokd.core.registry import build_backbone, resolve_arch


def per_layer_reforward(model: torch.nn.Module, images: torch.Tensor, patch: int) -> np.ndarray:
    """The reference: for each layer, run the blocks before it again and compute its attention by hand."""
    grid = (images.shape[-2] // patch, images.shape[-1] // patch)
    values = []
    with torch.inference_mode():
        for layer, block in enumerate(model.blocks):
            x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
            for previous in model.blocks[:layer]:
                x = previous(x)
            y = block.norm1(x)
            batch, tokens, dim = y.shape
            heads = block.attn.num_heads
            qkv = block.attn.qkv(y).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            attention = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) / math.sqrt(dim // heads), dim=-1)
            values.append(mean_attention_distance(attention, grid, patch).mean(dim=0).numpy())
    return np.stack(values)


class Clock:
    """Wall and CPU seconds of a block: on a shared machine the CPU time is the steadier figure."""

    def __enter__(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def bench_mad(n_images: int) -> None:
    spec = resolve_arch("vit_s")
    torch.manual_seed(0)
    model = build_backbone(spec).eval()
    images = torch.randn(n_images, 3, 224, 224)
    with torch.inference_mode():
        model(images[:2])  # warm-up
    with Clock() as one_pass:
        meter = ViTDistance(model, spec.patch_size)
        meter.add(images)
    with Clock() as reforward:
        reference = per_layer_reforward(model, images, spec.patch_size)
    fused = [block.attn.fused_attn for block in model.blocks]
    for block in model.blocks:  # DINO's own ViT always computes attention explicitly
        block.attn.fused_attn = False
    with Clock() as explicit:
        per_layer_reforward(model, images, spec.patch_size)
    for block, value in zip(model.blocks, fused):
        block.attn.fused_attn = value
    difference = float(np.abs(meter.result() - reference).max())
    print(f"MAD, ViT-S/16 at 224 px, {n_images} images, 12 layers x 6 heads (wall / CPU seconds)")
    print(f"  per-layer re-forward, timm's fused attention:   {reforward.wall:7.2f} / {reforward.cpu:7.2f}   1.00x")
    print(f"  per-layer re-forward, explicit attention (DINO): {explicit.wall:7.2f} / {explicit.cpu:7.2f}")
    print(f"  mokd one pass with hooks:                        {one_pass.wall:7.2f} / {one_pass.cpu:7.2f}   "
          f"{reforward.wall / one_pass.wall:.2f}x / {reforward.cpu / one_pass.cpu:.2f}x faster than the fused, "
          f"{explicit.wall / one_pass.wall:.2f}x / {explicit.cpu / one_pass.cpu:.2f}x than the explicit re-forward")
    print(f"  largest difference between the two: {difference:.2e} px")


def bench_tsne(n_points: int = 5000, dim: int = 384, n_classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(n_classes), n_points // n_classes)
    features = rng.normal(size=(len(labels), dim)).astype(np.float32) + 3 * rng.normal(size=(n_classes, dim))[labels]
    with Clock() as total:
        with Clock() as embedding_clock:
            embedding = embed(features, seed=0)
        with tempfile.TemporaryDirectory() as folder:
            aligned = aligned_embeddings([embedding], labels, list(range(n_classes)))
            plot_tsne(aligned, labels, list(range(n_classes)), ["model"], [str(c) for c in range(n_classes)],
                      Path(folder) / "tsne")
    print(f"t-SNE ({engine_name()}), {len(labels)} x {dim} features, {n_classes} classes (wall / CPU seconds)")
    print(f"  embedding {embedding_clock.wall:.2f} / {embedding_clock.cpu:.2f}; end to end with alignment and "
          f"figure {total.wall:.2f} / {total.cpu:.2f} (target: at most 30 s)")
    print(f"  machine load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench_mad(args.images)
    bench_tsne()


if __name__ == "__main__":
    main()
