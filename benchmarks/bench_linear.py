"""Benchmark: linear probe cached mode vs protocol mode, and the fine-tuning engine vs a bare PyTorch loop.

Usage: python benchmarks/bench_linear.py [--epochs 30 --data digits --engine-data shapes:1000]

1. `mokd-eval linear` on the same checkpoint (a timm-initialised r_tiny saved in DINO's layout), data, epochs
   and batch, in the same run: `--mode protocol` (augmented images through the frozen backbone every epoch, one
   lr) against `--mode cached` (one extraction into the feature cache, then the whole lr sweep on the features),
   with a cold cache and again with the cache warm. Wall time of the command's logic and top-1 on val.
2. The engine (`mokd_eval.finetune.fit`: schedule, tqdm, accumulation bookkeeping, per-epoch checkpoint and log)
   against a bare loop (DataLoader -> forward -> cross-entropy -> backward -> SGD step) fine-tuning the same
   model from the same weights on the same dataset and batch; images per second, best of `--repeats`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mokd.core.data import open_dataset, parse_data_spec, train_transform
from mokd.core.distributed import setup
from mokd.core.features import FeatureCache, FeatureKind
from mokd_eval.finetune import Classifier, FitSettings, fit
from mokd_eval.linear_eval import run_linear
from mokd.core.pipeline import FeatureOptions, RunSettings
from mokd_eval.protocols import TrainOptions
from mokd.core.registry import ALIASES, build_backbone
from mokd.core.results import format_table

CNN = ALIASES["r_tiny"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", help="dataset of the linear-probe section")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of both linear modes")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--engine-data", default="shapes:1000", help="dataset of the engine section")
    parser.add_argument("--engine-epochs", type=int, default=2)
    parser.add_argument("--engine-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-linear", action="store_true")
    parser.add_argument("--skip-engine", action="store_true")
    return parser.parse_args()


def dino_checkpoint(path: Path) -> Path:
    """A timm-initialised r_tiny in DINO's checkpoint layout (random weights, but informative features)."""
    torch.manual_seed(0)
    state = {f"module.backbone.{name}": tensor for name, tensor in build_backbone(CNN).state_dict().items()}
    torch.save({"teacher": state, "student": state, "epoch": 0, "args": argparse.Namespace(arch="resnet_tiny")},
               path)
    return path


def linear_section(args: argparse.Namespace, work: Path) -> list[list]:
    """Cached mode first (it chooses the lr on its held-out slice), then protocol mode at that same lr, so that
    the two differ only in what the protocol is about: augmented images through the backbone every epoch."""
    checkpoint = dino_checkpoint(work / "dino.pth")
    context = setup("cpu")
    cache = FeatureCache(work / "cache")
    features = FeatureOptions(cache=cache, kind=FeatureKind(), batch_size=256, num_workers=0, device="cpu")
    runs = {}
    for name, mode in (("cold", "cached"), ("warm", "cached"), ("protocol", "protocol")):
        lrs = (runs["cold"][1]["protocol"]["lr_chosen"],) if mode == "protocol" else None
        options = TrainOptions(epochs=args.epochs, batch_size=args.batch_size, lrs=lrs, num_workers=0, seed=0)
        start = time.perf_counter()
        payload = run_linear(checkpoint, RunSettings(data=args.data, echo=lambda _: None), mode=mode, features=features,
                             feature_given=False, options=options, out=work / f"{name}.json", context=context)
        runs[name] = (time.perf_counter() - start, payload["results"][0])
    reference_seconds, reference = runs["protocol"]
    labels = {"protocol": "protocol (augmented images, the cached winner's lr)",
              "cold": "cached, cold cache (extraction + 8-lr sweep)", "warm": "cached, warm cache (8-lr sweep)"}
    rows = []
    for name in ("protocol", "cold", "warm"):
        seconds, entry = runs[name]
        top1 = entry["metrics"]["linear"]["top1"]
        rows.append([labels[name], f"{seconds:.1f} s", f"{reference_seconds / seconds:.1f}x", f"{top1:.2f}",
                     f"{top1 - reference['metrics']['linear']['top1']:+.2f}", f"{entry['protocol']['lr_chosen']:.3g}"])
    return rows


def bare_loop(model: torch.nn.Module, loader: DataLoader, epochs: int, lr: float) -> float:
    """The reference: nothing but the training step (channels_last, like the engine)."""
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    model.train()
    images_seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for images, labels in loader:
            loss = F.cross_entropy(model(images.contiguous(memory_format=torch.channels_last)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images_seen += len(labels)
    return images_seen / (time.perf_counter() - start)


def engine_section(args: argparse.Namespace, work: Path) -> list[list]:
    spec = parse_data_spec(args.engine_data)
    train = open_dataset(spec, "train", train_transform(spec, crop="padded")[0])
    context = setup("cpu")

    def fresh() -> Classifier:
        torch.manual_seed(0)
        return Classifier(build_backbone(CNN), CNN, FeatureKind(), train.num_classes, frozen=False)

    settings = FitSettings(epochs=args.engine_epochs, batch_size=args.engine_batch, lr=0.5, warmup_epochs=0,
                           num_workers=0, seed=0)
    bare_rates, engine_rates = [], []
    for repeat in range(args.repeats):  # interleaved, so that machine load hits both alike
        loader = DataLoader(train, batch_size=args.engine_batch, shuffle=True, num_workers=0)
        bare_rates.append(bare_loop(fresh(), loader, args.engine_epochs, settings.scaled_lr()))
        result = fit(fresh(), train, settings, run_dir=work / f"engine-{repeat}", context=context)
        engine_rates.append(result.images_per_second)
    bare, engine = max(bare_rates), max(engine_rates)
    return [["bare PyTorch loop", f"{bare:.1f}", "100.0 %"],
            ["mokd engine (fit)", f"{engine:.1f}", f"{100 * engine / bare:.1f} %"]]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_linear:
            rows = linear_section(args, work)
            print(format_table(["linear probe", "wall time", "speed-up", "top1", "vs protocol", "lr"], rows,
                               title=f"r_tiny on {args.data}, {args.epochs} epochs, batch {args.batch_size}, "
                                     f"{args.threads} threads"))
            print()
        if not args.skip_engine:
            rows = engine_section(args, work)
            print(format_table(["fine-tuning loop", "images/s", "of bare"], rows,
                               title=f"r_tiny fine-tuning on {args.engine_data}, batch {args.engine_batch}, "
                                     f"{args.engine_epochs} epochs, best of {args.repeats}"))


if __name__ == "__main__":
    main()
