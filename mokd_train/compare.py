"""`mokd-eval demo --methods mokd,dogo,mcl`: online-distillation methods on one harness, each against its
own Independent baseline.

For every method, the `tiny` pair is trained twice on digits with the same seed, data order, crops and epoch
budget: `--mode independent` (each model alone with the method's self term: DINO for mokd and the dino+
adaptations, SimCLR for dogo, MoCo v1 for mcl) and the method itself. The models `mokd-eval` evaluates by
default (MOKD's teachers, the other methods' online networks) are k-NN-evaluated, and one table prints Net1
and Net2: Independent vs method and the delta. Lives in mokd_train because it trains (imports point down).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from mokd_train.demo import DEMO_DATA, DEMO_IMAGE_SIZE, DEMO_SETTINGS, raw_pixel_knn
from mokd.core.errors import MokdError
from mokd.core.features import FeatureCache
from mokd_eval.knn_eval import run_knn
from mokd.core.pipeline import FeatureOptions, RunSettings, open_eval_data
from mokd.core.results import StageTimer, build_results, format_table, write_results
from mokd_train.config import resolve_config
from mokd_train.engine import train
from mokd_train.methods import METHODS, method_label

MODES = ("independent", "mokd")
# What `--mode independent` trains for each method.
BASELINES = {"mokd": "DINO", "dogo": "SimCLR", "mcl": "MoCo v1", "dino+dogo": "DINO", "dino+mcl": "DINO"}


def parse_methods(text: str) -> tuple[str, ...]:
    """`mokd,dogo,mcl` -> ("mokd", "dogo", "mcl"); unknown or repeated names are a one-line error."""
    methods = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [method for method in methods if method not in METHODS]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise MokdError(f"--methods takes distinct names from {', '.join(METHODS)} separated by commas, got {text!r}")
    return methods


def run_compare_demo(output_dir: Path, methods: tuple[str, ...], *, epochs: int | None, seed: int, device: str,
                     ks: tuple[int, ...], temperature: float, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every method in both modes, evaluate, print the table; returns the summary payload."""
    timer = StageTimer()
    runs: dict[tuple[str, str], dict[str, Any]] = {}
    features = FeatureOptions(cache=FeatureCache(None), num_workers=0, device=device)
    for method in methods:
        for mode in MODES:
            run_dir = output_dir / method / mode
            settings = {**DEMO_SETTINGS, "method": method, "mode": mode, "seed": seed, "device": device,
                        "data": DEMO_DATA, "output_dir": str(run_dir)}
            if epochs is not None:
                settings["epochs"] = epochs
            config = resolve_config("tiny", None, settings)
            name = f"{method_label(method)} / {mode}"
            echo(f"\n== training: {name} ==")
            with timer.stage(f"train_{method}_{mode}"):
                summary = train(config)
            echo(f"\n== k-NN: {name} ==")
            with timer.stage(f"knn_{method}_{mode}"):
                run = RunSettings(data=DEMO_DATA, image_size=DEMO_IMAGE_SIZE, seed=seed, echo=echo)
                payload = run_knn(summary["checkpoint"], run, ks=ks, temperature=temperature, features=features)
            write_results(run_dir / "knn.json", payload)
            runs[(method, mode)] = {"config": config.to_dict(), "checkpoint": str(summary["checkpoint"]),
                                    "knn": payload}
    with timer.stage("raw_pixels"):
        baseline = raw_pixel_knn(open_eval_data(DEMO_DATA, image_size=DEMO_IMAGE_SIZE), ks, temperature)
    echo("\n" + comparison_table(runs, methods, baseline))
    first = runs[(methods[0], "mokd")]["knn"]
    results = [{**entry, "method": method, "method_label": method_label(method), "mode": mode}
               for (method, mode), run in runs.items() for entry in run["knn"]["results"]]
    payload = build_results(command="demo-compare", protocol=first["protocol"], dataset=first["dataset"],
                            results=results, timings=timer.as_dict(), seed=seed,
                            config={"output_dir": str(output_dir), "methods": list(methods), "epochs": epochs,
                                    "raw_pixel_knn": baseline,
                                    "train_configs": {f"{method}/{mode}": run["config"]
                                                      for (method, mode), run in runs.items()}})
    path = write_results(output_dir / "summary.json", payload)
    echo(f"results: {path}")
    return payload


def _best(entry: dict[str, Any]) -> float:
    return entry["metrics"]["knn"][str(entry["best_k"])]["top1"]


def comparison_table(runs: dict[tuple[str, str], dict[str, Any]], methods: tuple[str, ...],
                     baseline: dict[str, Any]) -> str:
    """Best-k top-1 per model: each method next to its own Independent baseline (named in the first column)."""
    rows = []
    for method in methods:
        alone, together = runs[(method, "independent")]["knn"]["results"], runs[(method, "mokd")]["knn"]["results"]
        for index, (plain, paired) in enumerate(zip(alone, together)):
            rows.append([f"{method_label(method)} (vs {BASELINES[method]})", f"Net{index + 1} ({plain['arch']})",
                         _best(plain), _best(paired), _best(paired) - _best(plain)])
    rows.append(["raw pixels (reference)", "", baseline["metrics"][str(baseline["best_k"])]["top1"], "", ""])
    return format_table(["Method (vs its baseline)", "Backbone", "Independent", "Method", "delta"], rows,
                        title=f"k-NN top-1 (%) on {DEMO_DATA} val, best k: online-distillation methods, "
                              f"same seed, data order and epochs")
