"""`mokd-eval demo` (what `make demo` runs): the paper's Table 1 in miniature, on CPU, in minutes.

For each seed: the `tiny` pair (r_tiny + vit_mini, a 4-block ViT-T with 4-px patches) at random initialisation,
trained on scikit-learn's digits with `independent` (each model alone with DINO's loss) and with `mokd` (self +
cross distillation), same seed and data stream. All models are k-NN-evaluated; the table prints random init,
Independent, MOKD and MOKD - Independent per net (mean +/- std over seeds when there are several), next to a
raw-pixel k-NN for scale. Numbers are what they are: a few CPU epochs on 1,437 images are not ImageNet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mokd.core.errors import MokdError
from mokd.core.features import FeatureCache
from mokd_eval.knn import knn_classify
from mokd_eval.knn_eval import run_knn
from mokd.core.pipeline import EvalData, FeatureOptions, RunSettings, open_eval_data
from mokd.core.results import StageTimer, build_results, format_table, write_results
from mokd_train.config import resolve_config
from mokd_train.engine import save_initial_checkpoint, train

MODES = ("independent", "mokd")
RANDOM_INIT = "random_init"
DEMO_DATA = "digits"
# digits are 8x8 scans, so 16 px globals (8 px locals) lose nothing and cost a quarter of 32 px:
# that is what fits both trainings and the evaluation in ten minutes on 2 CPU cores.
DEMO_IMAGE_SIZE = 16
DEMO_SETTINGS = {"img_size": DEMO_IMAGE_SIZE, "local_size": DEMO_IMAGE_SIZE // 2}


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
             temperature: float, seeds: int = 1, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """For each seed: random init, both trainings, k-NN of every model; returns the summary payload."""
    if seeds < 1:
        raise MokdError(f"--seeds must be at least 1, got {seeds}")
    timer = StageTimer()
    features = FeatureOptions(cache=FeatureCache(None), num_workers=0, device=device)
    runs: dict[int, dict[str, dict[str, Any]]] = {}
    for run_seed in range(seed, seed + seeds):
        seed_dir = output_dir if seeds == 1 else output_dir / f"seed{run_seed}"
        runs[run_seed] = {}
        for mode in (RANDOM_INIT, *MODES):
            settings = {**DEMO_SETTINGS, "mode": "independent" if mode == RANDOM_INIT else mode, "seed": run_seed,
                        "device": device, "data": DEMO_DATA, "output_dir": str(seed_dir / mode)}
            if epochs is not None:
                settings["epochs"] = epochs
            config = resolve_config("tiny", None, settings)
            echo(f"\n== seed {run_seed}: {mode.replace('_', ' ')} ==")
            with timer.stage(f"train_{mode}"):
                checkpoint = (save_initial_checkpoint(config) if mode == RANDOM_INIT else train(config)["checkpoint"])
            with timer.stage(f"knn_{mode}"):
                run = RunSettings(data=DEMO_DATA, image_size=DEMO_IMAGE_SIZE, seed=run_seed, echo=echo)
                payload = run_knn(checkpoint, run, ks=ks, temperature=temperature, features=features)
            write_results(seed_dir / mode / "knn.json", payload)
            runs[run_seed][mode] = {"config": config.to_dict(), "checkpoint": str(checkpoint), "knn": payload}

    with timer.stage("raw_pixels"):
        baseline = raw_pixel_knn(open_eval_data(DEMO_DATA, image_size=DEMO_IMAGE_SIZE), ks, temperature)
    table = comparison_table(runs, baseline)
    echo("\n" + table)
    results = [{**entry, "mode": mode, "seed": run_seed} for run_seed, by_mode in runs.items()
               for mode, run in by_mode.items() for entry in run["knn"]["results"]]
    first = runs[seed]["mokd"]["knn"]
    payload = build_results(command="demo", protocol=first["protocol"], dataset=first["dataset"], results=results,
                            timings=timer.as_dict(), seed=seed,
                            config={"output_dir": str(output_dir), "epochs": epochs, "seeds": list(runs),
                                    "raw_pixel_knn": baseline, "best_k_top1": best_top1(runs),
                                    "train_configs": {mode: run["config"] for mode, run in runs[seed].items()}})
    path = write_results(output_dir / "summary.json", payload)
    echo(f"results: {path}")
    return payload


def _best(entry: dict[str, Any]) -> float:
    return entry["metrics"]["knn"][str(entry["best_k"])]["top1"]


def best_top1(runs: dict[int, dict[str, dict[str, Any]]]) -> dict[str, dict[str, list[float]]]:
    """Best-k top-1 per net and mode, one value per seed: {"Net1 (r_tiny)": {"mokd": [...], ...}}."""
    table: dict[str, dict[str, list[float]]] = {}
    for by_mode in runs.values():
        for mode, run in by_mode.items():
            for index, entry in enumerate(run["knn"]["results"]):
                net = f"Net{index + 1} ({entry['arch']})"
                table.setdefault(net, {}).setdefault(mode, []).append(_best(entry))
    return table


def _mean_std(values: list[float]) -> str | float:
    """A single value as is; several as `mean +/- std` (sample std, ddof 1)."""
    if len(values) == 1:
        return values[0]
    return f"{np.mean(values):.2f} +/- {np.std(values, ddof=1):.2f}"


def comparison_table(runs: dict[int, dict[str, dict[str, Any]]], baseline: dict[str, Any]) -> str:
    """Table 1 of the paper in miniature: best-k top-1 per net at random init, Independent and MOKD, and the
    deltas MOKD - Independent and trained - random init (per seed, then mean +/- std)."""
    rows = []
    for net, by_mode in best_top1(runs).items():
        init, plain, mokd = (np.array(by_mode[mode]) for mode in (RANDOM_INIT, *MODES))
        rows.append([net, _mean_std(list(init)), _mean_std(list(plain)), _mean_std(list(mokd)),
                     _mean_std(list(mokd - plain)), _mean_std(list(plain - init)), _mean_std(list(mokd - init))])
    rows.append(["raw pixels (reference)", baseline["metrics"][str(baseline["best_k"])]["top1"], "", "", "", "", ""])
    seeds = f", mean +/- std over {len(runs)} seeds" if len(runs) > 1 else ""
    return format_table(["Backbone", "random init", "Independent", "MOKD", "MOKD - Ind.", "Ind. - init",
                         "MOKD - init"], rows,
                        title=f"k-NN top-1 (%) on {DEMO_DATA} val, best k (paper Table 1 style{seeds})")
