"""`mokd-eval attention`: where the class token of any ViT layer looks, per head, over sample images (a grid figure).

The maps come from the same one-pass hooks as the mean attention distance (`record_attention`), so any layer
can be shown, not only the last one (DINO's `get_last_selfattention`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mokd_analysis.attention_distance import record_attention
from mokd_analysis.mad_eval import sample_images
from mokd.core import atomic
from mokd.core.data import IMAGENET_MEAN, IMAGENET_STD
from mokd.core.distributed import choose_device
from mokd.core.errors import MokdError
from mokd.core.pipeline import RunSettings, load_models, model_record, open_data_for
from mokd.core.results import StageTimer, build_results, format_table

TITLE_SPACE = 0.45  # inches above the grid for the figure title and the head titles


def resolve_layer(layer: int, depth: int) -> int:
    """1-based layer (as in the paper's plots) or negative from the end (-1 = last) to a 0-based index."""
    index = layer - 1 if layer > 0 else depth + layer
    if layer == 0 or not 0 <= index < depth:
        raise MokdError(f"--layer {layer}: the ViT has layers 1..{depth} (or -1..-{depth} from the end)")
    return index


def class_token_maps(module: torch.nn.Module, images: torch.Tensor, layer: int, patch: int,
                     device: torch.device = torch.device("cpu")) -> np.ndarray:
    """B x heads x rows x cols: the class token's attention on the patches of 0-based `layer`, computed on `device`."""
    captured: list[torch.Tensor] = []
    with record_attention(module, lambda _layer, attention: captured.append(attention), layers=[layer]), \
            torch.inference_mode():
        module.to(device)(images.to(device))
    prefix = int(getattr(module, "num_prefix_tokens", 1))
    rows, cols = images.shape[-2] // patch, images.shape[-1] // patch
    attention = captured[0][:, :, 0, prefix:]
    return attention.reshape(*attention.shape[:2], rows, cols).cpu().numpy()


def plot_maps(images: torch.Tensor, maps: np.ndarray, title: str, stem: Path) -> dict[str, str]:
    """Rows = images; first column the image, then one map per head (each scaled to its own range)."""
    from mokd_analysis import style

    n_images, heads = maps.shape[:2]
    cols = heads + 1
    cell = style.TEXT_WIDTH / cols
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    with style.paper_style():
        height = cell * n_images + TITLE_SPACE
        fig, axes = style.figure(style.TEXT_WIDTH, height, ncols=cols, nrows=n_images)
        extent = (0, images.shape[-1], images.shape[-2], 0)
        for row in range(n_images):
            picture = (images[row].cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
            axes[row, 0].imshow(picture, extent=extent)
            for head in range(heads):
                axes[row, head + 1].imshow(maps[row, head], cmap="inferno", extent=extent, interpolation="nearest")
                if row == 0:
                    axes[row, head + 1].set_title(f"head {head + 1}")
            for ax in axes[row]:
                ax.set_axis_off()
        axes[0, 0].set_title("image")
        fig.suptitle(title, y=1 - 0.06 / height, va="top")
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - TITLE_SPACE / height, wspace=0.04,
                            hspace=0.04)
        return style.save(fig, stem)


def run_attention(checkpoint: Path, run: RunSettings, *, layer: int, images: int = 4, device: str = "auto",
                  out_stem: Path) -> dict[str, Any]:
    """Class-token attention maps of `layer` for every ViT of the checkpoint; a checkpoint without one is refused."""
    timer = StageTimer()
    torch_device = choose_device(device, 0)
    with timer.stage("load"):
        loaded = load_models(checkpoint, model=run.model, key=run.key, trust=run.trust, echo=run.echo)
        eval_data, resolution = open_data_for(loaded, run)
        vits = [entry for entry in loaded if entry.spec.is_vit]
        if not vits:
            raise MokdError(f"{checkpoint}: no ViT among {', '.join(f'{e.key} ({e.spec.name})' for e in loaded)}; "
                            "attention maps need a ViT (choose one with --key)")
        batch, indices = sample_images(eval_data.val, images, run.seed)
    results, figures = [], {}
    with timer.stage("maps"):
        for entry in vits:
            index = resolve_layer(layer, entry.spec.depth)
            if batch.shape[-1] % entry.spec.patch_size:
                raise MokdError(f"image size {batch.shape[-1]} is not a multiple of the patch size "
                                f"{entry.spec.patch_size}: choose another --image-size")
            maps = class_token_maps(entry.module.eval(), batch, index, entry.spec.patch_size, torch_device)
            stem = out_stem.with_name(f"{out_stem.name}_{entry.key}") if len(vits) > 1 else out_stem
            paths = plot_maps(batch, maps, f"{Path(checkpoint).stem}:{entry.key} ({entry.spec.name}), "
                                           f"layer {index + 1}: class-token attention", stem)
            maps_path = atomic.save_numpy(stem.with_name(stem.name + ".npy"), maps.astype(np.float32))
            figures[entry.key] = paths
            results.append({**model_record(entry), "metrics": {"attention": {
                "layer": index + 1, "heads": int(maps.shape[1]), "maps": str(maps_path), "figure": paths,
                "cls_mass_on_patches": maps.sum(axis=(2, 3)).mean(axis=0).round(4).tolist()}}})
    protocol = {"name": "attention", "layer": layer, "images": len(indices), "image_size": int(batch.shape[-1]),
                "image_size_from": resolution.source,
                "map": "class-token row of softmax(qk^T/sqrt(d)) over the patches, per head"}
    config = {"checkpoint": str(checkpoint), "model": run.model, "key": run.key, "device": device,
              "image_indices": indices}
    payload = build_results(command="attention", protocol=protocol, dataset=eval_data.record(), results=results,
                            timings=timer.as_dict(), seed=run.seed, config=config)
    payload["figures"] = figures
    return payload


def attention_table(payload: dict[str, Any]) -> str:
    rows = []
    for entry in payload["results"]:
        info = entry["metrics"]["attention"]
        mass = ", ".join(f"{value:.2f}" for value in info["cls_mass_on_patches"])
        rows.append([f"{entry['key']} ({entry['arch']})", info["layer"], mass, info["figure"]["png"]])
    return format_table(["model", "layer", "class-token mass on patches per head", "figure"], rows,
                        title=f"Attention maps on {payload['protocol']['images']} {payload['dataset']['spec']} images")
