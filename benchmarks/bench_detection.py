"""Benchmark: training iterations/s and evaluation images/s of mokd's C4 Mask R-CNN (torchvision engine)
against torchvision's stock `maskrcnn_resnet50_fpn` and, where importable, detectron2's own R-C4.

Usage: python benchmarks/bench_detection.py [--size 256 --batch 2 --steps 3 --warmup 1 --archs r18 r50]

Every detector sees the same batch: `--batch` random `--size` x `--size` images with three boxes and masks each,
80 COCO classes, random-init backbones, BatchNorm in training mode (MoCo's preset; detectron2 "BN" on one process).
Input sizes are fixed to `--size` for all (no resizing inside). The fastest of `--steps` timed steps is reported
(the least disturbed on a shared machine) with the median. Ratios are against detectron2's step at the same
configuration when it is importable (target: ours <= 1.2x), else against torchvision's FPN model.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Callable

import torch

from mokd_eval.detection.model import DetectorConfig, build_detector
from mokd.core.registry import ALIASES, build_backbone

NUM_CLASSES = 80


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--archs", nargs="+", default=["r18", "r50"], choices=["r18", "r34", "r50", "r101"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    return parser.parse_args()


def make_batch(size: int, batch: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, size, size, generator=generator))
        boxes, masks = [], torch.zeros(3, size, size, dtype=torch.uint8)
        for index in range(3):
            x0, y0 = (torch.rand(2, generator=generator) * size * 0.5).tolist()
            side = size * (0.2 + 0.2 * index)
            boxes.append([x0, y0, min(size, x0 + side), min(size, y0 + side)])
            masks[index, int(y0):int(y0 + side), int(x0):int(x0 + side)] = 1
        targets.append({"boxes": torch.tensor(boxes), "labels": torch.tensor([1, 5, 9]), "masks": masks})
    return images, targets


def timed(function: Callable[[], None], steps: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def torchvision_step(model: torch.nn.Module, images, targets) -> tuple[Callable[[], None], Callable[[], None]]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def train() -> None:
        model.train()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def evaluate() -> None:
        model.eval()
        with torch.no_grad():
            model(images)
    return train, evaluate


def ours(arch: str, head: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = DetectorConfig(num_classes=NUM_CLASSES, res5_head=head, train_sizes=(size, size), test_size=size,
                            max_size=size)
    return build_detector(build_backbone(ALIASES[arch]), config)[0]


def stock_fpn(size: int) -> torch.nn.Module:
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1, min_size=size,
                                 max_size=size, trainable_backbone_layers=5, norm_layer=torch.nn.BatchNorm2d)


def detectron2_steps(arch: str, size: int, images, targets) -> tuple[Callable[[], None], Callable[[], None]] | None:
    """detectron2's stock R-C4 Mask R-CNN (3-Bottleneck res5 + MoCo's extra norm) at the same configuration."""
    try:
        from detectron2.modeling import build_model
        from detectron2.structures import BitMasks, Boxes, Instances
        from detectron2.utils.events import EventStorage
    except ImportError:
        return None
    from mokd_eval.detection.d2_engine import build_config
    from mokd_eval.detection.train import Solver

    depth = {"r18": 18, "r34": 34, "r50": 50, "r101": 101}[arch]
    detector = dataclasses.replace(DetectorConfig(num_classes=NUM_CLASSES), train_sizes=(size, size), test_size=size,
                                   max_size=size)
    cfg = build_config(depth=depth, num_classes=NUM_CLASSES, res5_head="d2-bottleneck", norm="syncbn", world_size=1,
                       weights="", train_sets=(), test_sets=(), detector=detector, solver=Solver(iters=10),
                       output_dir=".", device="cpu", num_workers=0, seed=0)
    torch.manual_seed(0)
    model = build_model(cfg)
    inputs = []
    for image, target in zip(images, targets):
        instances = Instances((size, size), gt_boxes=Boxes(target["boxes"]), gt_classes=target["labels"] - 1,
                              gt_masks=BitMasks(target["masks"].bool()))
        inputs.append({"image": image * 255, "height": size, "width": size, "instances": instances})
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def train() -> None:
        model.train()
        with EventStorage(0):  # detectron2's heads log training statistics into it
            loss = sum(model(inputs).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def evaluate() -> None:
        model.eval()
        with torch.no_grad():
            model([{k: v for k, v in item.items() if k != "instances"} for item in inputs])
    return train, evaluate


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    images, targets = make_batch(args.size, args.batch)
    rows = []

    def measure(name: str, steps: tuple[Callable[[], None], Callable[[], None]]) -> dict:
        train, evaluate = steps
        train_best, train_median = timed(train, args.steps, args.warmup)
        eval_best, eval_median = timed(evaluate, args.steps, args.warmup)
        row = {"name": name, "train_s": train_best, "train_median": train_median, "eval_s": eval_best,
               "eval_median": eval_median}
        rows.append(row)
        print(f"{name:40s} train {train_best:7.3f} s/it (median {train_median:.3f})  "
              f"eval {args.batch / eval_best:6.2f} img/s (median {args.batch / eval_median:.2f})", flush=True)
        return row

    reference = measure("torchvision maskrcnn_resnet50_fpn", torchvision_step(stock_fpn(args.size), images, targets))
    for arch in args.archs:
        d2 = detectron2_steps(arch, args.size, images, targets)
        d2_row = measure(f"detectron2 {arch.upper()}-C4 (stock res5)", d2) if d2 else None
        heads = ["d2-bottleneck"] if arch in ("r50", "r101") else ["d2-bottleneck", "native"]
        for head in heads:
            row = measure(f"mokd {arch.upper()}-C4 ({head} res5)",
                          torchvision_step(ours(arch, head, args.size), images, targets))
            base = d2_row or reference
            print(f"    vs {base['name']}: train step {row['train_s'] / base['train_s']:.2f}x, "
                  f"eval {row['eval_s'] / base['eval_s']:.2f}x the time")
    print(f"(size {args.size}, batch {args.batch}, {args.threads} threads, fastest of {args.steps} steps)")


if __name__ == "__main__":
    main()
