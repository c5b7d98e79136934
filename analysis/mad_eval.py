"""`mokd-eval mad`: mean attention distance of checkpoints (or a random-init control), JSON and Fig. 5-style plot."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mokd_analysis.attention_distance import CNNDistance, ViTDistance, resnet_points
from mokd.core.distributed import choose_device
from mokd.core.errors import MokdError
from mokd.core.pipeline import RunSettings, load_models, model_record, open_data_for
from mokd.core.registry import ArchSpec, build_backbone, resolve_arch
from mokd.core.results import StageTimer, build_results, format_table

RANDOM_INIT = "random init"


@dataclass
class Measured:
    """One model to measure: its label in plots, its backbone and spec, and its results-JSON identity."""

    label: str
    spec: ArchSpec
    module: nn.Module
    record: dict[str, Any]


def sample_images(dataset, count: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """`count` readable validation images drawn with a seeded permutation, and their indices."""
    if count < 1:
        raise MokdError(f"--images must be at least 1, got {count}")
    order = np.random.default_rng(seed).permutation(len(dataset))
    images, indices = [], []
    for index in order:
        item = dataset[int(index)]
        if item is not None:
            images.append(item[0])
            indices.append(int(index))
        if len(images) == count:
            break
    if not images:
        raise MokdError("no readable validation images to measure attention on")
    return torch.stack(images), indices


def random_init(spec: ArchSpec, image_size: int, seed: int) -> Measured:
    """The randomly initialised architecture (seeded), the control curve of the plot."""
    spec = dataclasses.replace(spec, img_size=image_size)
    torch.manual_seed(seed)
    return Measured(RANDOM_INIT + f" ({spec.name})", spec, build_backbone(spec).eval(),
                    {"key": RANDOM_INIT, "arch": spec.name, "arch_spec": spec.to_dict(), "checkpoint": None})


def measure(entry: Measured, images: torch.Tensor, *, batch_size: int, device: torch.device, per_block: bool,
            renormalize: bool) -> tuple[list[str], np.ndarray]:
    """Layer names and the layer x head (ViT) or stage x 1 (ResNet) distances in pixels."""
    module = entry.module.to(device).eval()
    if entry.spec.is_vit:
        if images.shape[-1] % entry.spec.patch_size or images.shape[-2] % entry.spec.patch_size:
            raise MokdError(f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size "
                            f"{entry.spec.patch_size} of {entry.spec.name}: choose another --image-size")
        meter: ViTDistance | CNNDistance = ViTDistance(module, entry.spec.patch_size, renormalize=renormalize)
        names = [str(layer + 1) for layer in range(len(module.blocks))]
    else:
        meter = CNNDistance(module, per_block=per_block)
        names = [name for name, _ in resnet_points(module, per_block)]
    for start in tqdm(range(0, len(images), batch_size), desc=f"MAD {entry.label}", unit="batch", leave=False,
                      disable=len(images) <= batch_size):
        meter.add(images[start:start + batch_size].to(device))
    return names, meter.result()


def plot_mad(curves: Sequence[dict[str, Any]], stem: Path) -> dict[str, str]:
    """Paper Fig. 5 style: one panel per architecture, distance vs layer, one dot per head, a line through each
    model's per-layer mean, random init in grey."""
    from mokd_analysis import style

    groups: dict[str, list[dict[str, Any]]] = {}
    for curve in curves:
        groups.setdefault(curve["arch"], []).append(curve)
    width = style.COLUMN_WIDTH if len(groups) == 1 else style.TEXT_WIDTH
    with style.paper_style():
        fig, axes = style.figure(width, 2.4, ncols=len(groups))
        for ax, (arch, members) in zip(axes[0], groups.items()):
            trained = [c for c in members if c["key"] != RANDOM_INIT]
            colours = iter(style.palette(max(len(trained), 1)))
            for number, curve in enumerate(members):
                colour = style.CONTROL_COLOUR if curve["key"] == RANDOM_INIT else next(colours)
                values = np.asarray(curve["px"])
                x = np.arange(1, len(values) + 1) + (number - (len(members) - 1) / 2) * 0.08
                heads = values.shape[1]
                ax.scatter(np.repeat(x, heads), values.ravel(), s=6, color=colour, alpha=0.75, linewidths=0,
                           marker=style.MARKERS[number % len(style.MARKERS)])
                ax.plot(x, values.mean(axis=1), color=colour, linestyle="--" if curve["key"] == RANDOM_INIT else "-",
                        linewidth=0.9, label=curve["label"], marker=style.MARKERS[number % len(style.MARKERS)],
                        markersize=2.5)
            ax.set_xticks(range(1, len(members[0]["layers"]) + 1), members[0]["layers"])
            ax.set_xlabel("layer" if members[0]["is_vit"] else "stage")
            ax.set_ylabel("mean attention distance (px)")
            ax.set_title(arch)
            ax.legend(frameon=False, loc="best")
            ax.grid(axis="y", linewidth=0.3, alpha=0.5)
        fig.tight_layout()
        return style.save(fig, stem)


def run_mad(checkpoints: Sequence[Path], run: RunSettings, *, images: int = 64, batch_size: int = 16,
            device: str = "auto", per_block: bool = False, renormalize: bool = False, random_control: bool = False,
            out_stem: Path) -> dict[str, Any]:
    """Measure every model of every checkpoint (and the random-init controls) on the same images."""
    timer = StageTimer()
    with timer.stage("load"):
        loaded = [(checkpoint, entry) for checkpoint in checkpoints
                  for entry in load_models(checkpoint, model=run.model, key=run.key, trust=run.trust, echo=run.echo)]
        eval_data, resolution = open_data_for([entry for _, entry in loaded], run)
        batch, indices = sample_images(eval_data.val, images, run.seed)
        size = batch.shape[-1]
        measured = [Measured(f"{Path(checkpoint).stem}:{entry.key}", entry.spec, entry.module, model_record(entry))
                    for checkpoint, entry in loaded]
        if not checkpoints:
            if run.model is None:
                raise MokdError("give a checkpoint, or --model for the random-init control (e.g. --model vit_s)")
            measured.append(random_init(resolve_arch(run.model), size, run.seed))
        elif random_control:
            specs = {entry.spec.name: entry.spec for entry in measured}
            measured.extend(random_init(spec, size, run.seed) for spec in specs.values())
    run.echo(f"data: {eval_data.spec.text}, {len(indices)} val images at {size}px ({eval_data.transform})")
    torch_device = choose_device(device, 0)
    results, curves = [], []
    with timer.stage("measure"):
        for entry in measured:
            names, values = measure(entry, batch, batch_size=batch_size, device=torch_device, per_block=per_block,
                                    renormalize=renormalize)
            mad = {"layers": names, "px": values.round(4).tolist(), "mean_px": values.mean(axis=1).round(4).tolist(),
                   "label": entry.label}
            results.append({**entry.record, "metrics": {"mad": mad}})
            curves.append({"arch": entry.spec.name, "is_vit": entry.spec.is_vit, "key": entry.record["key"],
                           "label": entry.label, "layers": names, "px": values})
    with timer.stage("plot"):
        figures = plot_mad(curves, out_stem)
    protocol = {"name": "mad", "images": len(indices), "image_size": size, "image_size_from": resolution.source,
                "renormalize": renormalize,
                "per_block": per_block, "vit": "patch rows/columns of softmax(qk^T/sqrt(d)), CLS excluded",
                "cnn": "q = k = channel LayerNorm of the stage output, softmax(qk^T/sqrt(C)), P = stride"}
    config = {"checkpoints": [str(c) for c in checkpoints], "model": run.model, "key": run.key,
              "image_size": run.image_size,
              "batch_size": batch_size, "device": device, "image_indices": indices}
    payload = build_results(command="mad", protocol=protocol, dataset=eval_data.record(), results=results,
                            timings=timer.as_dict(), seed=run.seed, config=config)
    payload["figures"] = figures
    return payload


def mad_table(payload: dict[str, Any]) -> str:
    """Layers as rows, one column per model: mean over heads (min-max over heads for ViTs)."""
    entries = payload["results"]
    depth = max(len(e["metrics"]["mad"]["layers"]) for e in entries)
    rows = []
    for layer in range(depth):
        row: list[Any] = [layer + 1]
        for entry in entries:
            mad = entry["metrics"]["mad"]
            if layer >= len(mad["layers"]):
                row.append("-")
                continue
            heads = mad["px"][layer]
            spread = f" [{min(heads):.1f}-{max(heads):.1f}]" if len(heads) > 1 else ""
            row.append(f"{mad['layers'][layer]}: {mad['mean_px'][layer]:.1f}{spread}")
        rows.append(row)
    headers = ["#"] + [entry["metrics"]["mad"]["label"] for entry in entries]
    title = (f"Mean attention distance (px) over {payload['protocol']['images']} images at "
             f"{payload['protocol']['image_size']}px: mean over heads [min-max]")
    return format_table(headers, rows, title=title) + f"\nfigure: {payload['figures']['png']}"
