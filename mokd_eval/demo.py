"""`mokd-eval demo` (what `make demo` runs): the paper's Table 1 in miniature, on CPU, in minutes.

Trains the `tiny` pair (r_tiny + ViT-tiny with 4-px patches) on scikit-learn's digits twice, with the same seed
and data stream: `independent` (each model alone with DINO's loss) and `mokd` (self + cross distillation).
Then k-NN-evaluates all four models and prints Independent vs MOKD for Net1/Net2, next to a raw-pixel
k-NN for scale. Numbers are what they are: a few CPU epochs on 1,437 images are not ImageNet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mokd_eval.features import FeatureCache
from mokd_eval.knn import knn_classify
from mokd_eval.knn_eval import run_knn
from mokd_eval.pipeline import EvalData, FeatureOptions, open_eval_data
from mokd_eval.results import StageTimer, build_results, format_table, write_results

MODES = ("independent", "mokd")
DEMO_DATA = "digits"
# digits are 8x8 scans, so 16 px globals (8 px locals) lose nothing and cost a quarter of 32 px:
# that is what fits both trainings and the evaluation in ten minutes on 2 CPU cores.
DEMO_IMAGE_SIZE = 16
DEMO_SETTINGS = {"img_size": DEMO_IMAGE_SIZE, "local_size": DEMO_IMAGE_SIZE // 2, "epochs": 4}


def raw_pixel_knn(data: EvalData, ks: tuple[int, ...], temperature: float) -> dict[str, Any]:
    """k-NN on the normalised pixels themselves: the floor any learned feature should be compared with."""

    def pixels(dataset) -> tuple[np.ndarray, np.ndarray]:
        items = [dataset[index] for index in range(len(dataset))]
        return (torch.stack([image for image, _ in items]).flatten(1).numpy(),
                np.array([label for _, label in items], dtype=np.int64))

    train_x, train_y = pixels(data.train)
    val_x, val_y = pixels(data.val)
    outcome = knn_classify(train_x, train_y, val_x, val_y, num_classes=data.train.num_classes, ks=ks,
                           temperature=temperature)
    return {"best_k": outcome.best_k, "metrics": {str(k): v for k, v in outcome.metrics.items()}}


def run_demo(output_dir: Path, *, epochs: int | None, seed: int, device: str, ks: tuple[int, ...],
             temperature: float, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train both modes, evaluate the four models, and return the summary payload."""
    from mokd_train.config import resolve_config
    from mokd_train.engine import train

    timer = StageTimer()
    runs: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        settings = {**DEMO_SETTINGS, "mode": mode, "seed": seed, "device": device, "data": DEMO_DATA,
                    "output_dir": str(output_dir / mode)}
        if epochs is not None:
            settings["epochs"] = epochs
        config = resolve_config("tiny", None, settings)
        echo(f"\n== training: {mode} ==")
        with timer.stage(f"train_{mode}"):
            summary = train(config)
        echo(f"\n== k-NN: {mode} ==")
        with timer.stage(f"knn_{mode}"):
            payload = run_knn(summary["checkpoint"], data=DEMO_DATA, ks=ks, temperature=temperature, seed=seed,
                              image_size=DEMO_IMAGE_SIZE,
                              features=FeatureOptions(cache=FeatureCache(None), num_workers=0, device=device),
                              echo=echo)
        write_results(output_dir / mode / "knn.json", payload)
        runs[mode] = {"config": config.to_dict(), "checkpoint": str(summary["checkpoint"]), "knn": payload}

    with timer.stage("raw_pixels"):
        baseline = raw_pixel_knn(open_eval_data(DEMO_DATA, image_size=DEMO_IMAGE_SIZE), ks, temperature)
    table = comparison_table(runs, baseline)
    echo("\n" + table)
    results = [{**entry, "mode": mode} for mode, run in runs.items() for entry in run["knn"]["results"]]
    payload = build_results(command="demo", protocol=runs["mokd"]["knn"]["protocol"],
                            dataset=runs["mokd"]["knn"]["dataset"], results=results, timings=timer.as_dict(),
                            seed=seed, config={"output_dir": str(output_dir), "epochs": epochs,
                                               "raw_pixel_knn": baseline,
                                               "train_configs": {mode: run["config"] for mode, run in runs.items()}})
    path = write_results(output_dir / "summary.json", payload)
    echo(f"results: {path}")
    return payload


def _best(entry: dict[str, Any]) -> float:
    return entry["metrics"]["knn"][str(entry["best_k"])]["top1"]


def comparison_table(runs: dict[str, dict[str, Any]], baseline: dict[str, Any]) -> str:
    """Table 1 of the paper in miniature: best-k top-1 per model, Independent vs MOKD."""
    rows = []
    for index, (plain, mokd) in enumerate(zip(runs["independent"]["knn"]["results"], runs["mokd"]["knn"]["results"])):
        rows.append([f"Net{index + 1} ({plain['arch']})", _best(plain), _best(mokd), _best(mokd) - _best(plain)])
    rows.append(["raw pixels (reference)", baseline["metrics"][str(baseline["best_k"])]["top1"], "", ""])
    return format_table(["Backbone", "Independent", "MOKD", "delta"], rows,
                        title=f"k-NN top-1 (%) on {DEMO_DATA} val, best k (paper Table 1 style)")
