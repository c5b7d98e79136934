"""`--engine detectron2`: the paper's exact setup where detectron2 is importable (an optional extra).

The backbone is exported in MoCo's converter naming, MoCo's R-C4 transfer config is built in Python
(SyncBN everywhere -- BatchNorm on one process --, nothing frozen, an extra norm after res5, precise BN),
the data is registered with detectron2's COCO loader, detectron2's DefaultTrainer trains and its
COCOEvaluator evaluates. Only this module imports detectron2.
"""

from __future__ import annotations

import math
import pickle
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mokd.core import atomic
from mokd_eval.detection import shapes_coco
from mokd_eval.detection.coco_data import SHAPES_KIND, CocoData
from mokd_eval.detection.evaluation import METRICS, json_safe
from mokd_eval.detection.model import DetectorConfig
from mokd.core.errors import MokdError
from mokd_eval.export import detectron2_state

PIXEL_MEAN_255 = [123.675, 116.28, 103.53]  # ImageNet mean/std on 0..255, RGB (MoCo)
PIXEL_STD_255 = [58.395, 57.12, 57.375]
EXTRA_NORM_HEAD = "MokdRes5ExtraNorm"
NATIVE_HEAD = "MokdNativeRes5"
NATIVE_EXTRA_NORM_HEAD = "MokdNativeRes5ExtraNorm"


def _register_heads() -> None:
    """Three Res5ROIHeads variants: stock + extra norm (MoCo), and the backbone's own res5 with/without it."""
    from detectron2.layers import get_norm
    from detectron2.modeling import ROI_HEADS_REGISTRY
    from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock, ResNet
    from detectron2.modeling.roi_heads import Res5ROIHeads
    from torch import nn

    if EXTRA_NORM_HEAD in ROI_HEADS_REGISTRY:
        return

    def native_res5(cfg) -> tuple[nn.Sequential, int]:
        """res5 = the ResNet's own layer4: BasicBlocks for R18/R34, so every pretrained tensor has a home."""
        resnets = cfg.MODEL.RESNETS
        depth = resnets.DEPTH
        blocks = {18: 2, 34: 3, 50: 3, 101: 3}[depth]
        out_channels = resnets.RES2_OUT_CHANNELS * 8
        if depth >= 50:
            width = resnets.NUM_GROUPS * resnets.WIDTH_PER_GROUP * 8
            stage = ResNet.make_stage(BottleneckBlock, blocks, stride_per_block=[2] + [1] * (blocks - 1),
                                      in_channels=out_channels // 2, bottleneck_channels=width,
                                      out_channels=out_channels, num_groups=resnets.NUM_GROUPS, norm=resnets.NORM,
                                      stride_in_1x1=resnets.STRIDE_IN_1X1)
        else:
            stage = ResNet.make_stage(BasicBlock, blocks, stride_per_block=[2] + [1] * (blocks - 1),
                                      in_channels=out_channels // 2, out_channels=out_channels, norm=resnets.NORM)
        return nn.Sequential(*stage), out_channels

    def with_norm(build: Callable) -> Callable:
        def wrapped(cls, cfg):
            seq, channels = build(cfg)
            seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, channels))
            return seq, channels
        return classmethod(wrapped)

    stock = Res5ROIHeads._build_res5_block.__func__
    ROI_HEADS_REGISTRY.register(type(EXTRA_NORM_HEAD, (Res5ROIHeads,),
                                     {"_build_res5_block": with_norm(lambda cfg: stock(Res5ROIHeads, cfg))}))
    ROI_HEADS_REGISTRY.register(type(NATIVE_HEAD, (Res5ROIHeads,),
                                     {"_build_res5_block": classmethod(lambda cls, cfg: native_res5(cfg))}))
    ROI_HEADS_REGISTRY.register(type(NATIVE_EXTRA_NORM_HEAD, (Res5ROIHeads,),
                                     {"_build_res5_block": with_norm(native_res5)}))


def head_name(res5_head: str, norm: str) -> str:
    if res5_head == "native":
        return NATIVE_EXTRA_NORM_HEAD if norm == "syncbn" else NATIVE_HEAD
    return EXTRA_NORM_HEAD if norm == "syncbn" else "Res5ROIHeads"


def build_config(*, depth: int, num_classes: int, res5_head: str, norm: str, world_size: int, weights: str,
                 train_sets: tuple[str, ...], test_sets: tuple[str, ...], detector: Any, solver: Any,
                 output_dir: Path, device: str, num_workers: int, seed: int, precision: str = "fp32"):
    """MoCo's R-C4 transfer config (Base-RCNN-C4 + BN variant), value by value, as a detectron2 CfgNode."""
    from detectron2.config import get_cfg

    _register_heads()
    cfg = get_cfg()
    model = cfg.MODEL
    model.META_ARCHITECTURE = "GeneralizedRCNN"
    model.MASK_ON = True
    model.WEIGHTS = weights
    model.DEVICE = device
    model.PIXEL_MEAN, model.PIXEL_STD = list(PIXEL_MEAN_255), list(PIXEL_STD_255)
    cfg.INPUT.FORMAT = "RGB"
    model.BACKBONE.NAME = "build_resnet_backbone"
    model.BACKBONE.FREEZE_AT = 0 if norm == "syncbn" else 2
    model.RESNETS.DEPTH = depth
    model.RESNETS.OUT_FEATURES = ["res4"]
    model.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    model.RESNETS.STRIDE_IN_1X1 = False  # torchvision / MoCo layout: stride in the 3x3
    model.RESNETS.NORM = ("SyncBN" if world_size > 1 else "BN") if norm == "syncbn" else "FrozenBN"
    model.ANCHOR_GENERATOR.SIZES = [list(detector.anchor_sizes)]
    model.ANCHOR_GENERATOR.ASPECT_RATIOS = [list(detector.aspect_ratios)]
    model.RPN.IN_FEATURES = ["res4"]
    model.RPN.IOU_THRESHOLDS = list(detector.rpn_iou)
    model.RPN.BATCH_SIZE_PER_IMAGE = detector.rpn_batch_per_image
    model.RPN.POSITIVE_FRACTION = detector.rpn_positive_fraction
    model.RPN.PRE_NMS_TOPK_TRAIN, model.RPN.PRE_NMS_TOPK_TEST = detector.rpn_pre_nms_topk
    model.RPN.POST_NMS_TOPK_TRAIN, model.RPN.POST_NMS_TOPK_TEST = detector.rpn_post_nms_topk
    model.RPN.NMS_THRESH = detector.rpn_nms
    model.ROI_HEADS.NAME = head_name(res5_head, norm)
    model.ROI_HEADS.IN_FEATURES = ["res4"]
    model.ROI_HEADS.NUM_CLASSES = num_classes
    model.ROI_HEADS.BATCH_SIZE_PER_IMAGE = detector.rois_per_image
    model.ROI_HEADS.POSITIVE_FRACTION = detector.roi_positive_fraction
    model.ROI_HEADS.IOU_THRESHOLDS = [detector.roi_iou]
    model.ROI_HEADS.SCORE_THRESH_TEST = detector.score_thresh
    model.ROI_HEADS.NMS_THRESH_TEST = detector.test_nms
    model.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"
    model.ROI_BOX_HEAD.POOLER_RESOLUTION = detector.pooler_resolution
    model.ROI_BOX_HEAD.BBOX_REG_WEIGHTS = list(detector.box_weights)
    model.ROI_MASK_HEAD.POOLER_RESOLUTION = detector.pooler_resolution
    cfg.INPUT.MIN_SIZE_TRAIN = tuple(detector.train_sizes)
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "range"
    cfg.INPUT.MIN_SIZE_TEST = detector.test_size
    cfg.INPUT.MAX_SIZE_TRAIN = cfg.INPUT.MAX_SIZE_TEST = detector.max_size
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = train_sets, test_sets
    cfg.DATALOADER.NUM_WORKERS = num_workers
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True
    cfg.SOLVER.IMS_PER_BATCH = solver.batch_size
    cfg.SOLVER.BASE_LR = solver.scaled_lr
    cfg.SOLVER.MOMENTUM = solver.momentum
    cfg.SOLVER.WEIGHT_DECAY = solver.weight_decay
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.MAX_ITER = solver.iters
    cfg.SOLVER.STEPS = tuple(step for step in solver.steps if step < solver.iters)  # fvcore rejects the rest
    cfg.SOLVER.WARMUP_ITERS = solver.warmup_iters
    cfg.SOLVER.WARMUP_FACTOR = 0.001
    cfg.SOLVER.CHECKPOINT_PERIOD = solver.checkpoint_period
    if precision == "bf16":
        raise MokdError("--engine detectron2 trains in fp32 or fp16 (its AMP): use --precision fp32 or fp16")
    cfg.SOLVER.AMP.ENABLED = precision == "fp16" and device.startswith("cuda")  # MoCo's configs: fp32
    cfg.TEST.DETECTIONS_PER_IMAGE = detector.detections_per_image
    cfg.TEST.PRECISE_BN.ENABLED = norm == "syncbn" and solver.precise_bn_iters > 0
    cfg.TEST.PRECISE_BN.NUM_ITER = max(1, solver.precise_bn_iters)
    cfg.TEST.EVAL_PERIOD = 0  # evaluate once, after training (EvalHook's final evaluation)
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.SEED = seed
    cfg.freeze()
    return cfg


def _register_data(data: CocoData, work_dir: Path) -> tuple[str, str]:
    """Register both splits with detectron2 (shapes-coco is first written in COCO's layout)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    if data.text.startswith(SHAPES_KIND):
        _, count, size = data.text.split(":")
        root = work_dir / "shapes-coco"
        if not (root / "annotations" / "instances_val2017.json").is_file():
            shapes_coco.write_shapes_coco(root, int(count), int(size))
    else:
        root = Path(data.text)
    names = []
    for split, coco_split in (("train", data.train), ("val", data.val)):
        name = f"mokd_{data.text.replace('/', '_')}_{split}_{coco_split.fingerprint}"
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, str(root / "annotations" / f"instances_{split}2017.json"),
                                    str(root / f"{split}2017"))
        names.append(name)
    return names[0], names[1]


def _load_report(model: torch.nn.Module, exported: dict[str, Any]) -> dict[str, Any]:
    """Which exported tensors ended up in detectron2's model, checked by value (trunk under `backbone.`,
    res5 under `roi_heads.res5.`)."""
    state = model.state_dict()
    trunk_names = [n for n in exported if not n.startswith("res5.")]
    res5_names = [n for n in exported if n.startswith("res5.")]

    def equal(target: str, name: str) -> bool:
        return target in state and tuple(state[target].shape) == exported[name].shape and torch.equal(
            state[target].detach().cpu(), torch.as_tensor(exported[name]))

    trunk = sum(equal(f"backbone.{n}", n) for n in trunk_names)
    res5 = sum(equal(f"roi_heads.{n}", n) for n in res5_names)
    res5_model = [n for n in state if n.startswith("roi_heads.res5.") and not n.startswith("roi_heads.res5.norm.")
                  and not n.endswith("num_batches_tracked")]  # the extra norm is new by design
    return {"trunk_loaded": trunk, "trunk_total": len(trunk_names), "res5_loaded": res5,
            "res5_total": len(res5_model), "res5_in_checkpoint": len(res5_names)}


def run_detectron2(candidate: Any, data: CocoData, settings: Any, detector: DetectorConfig, context: Any, timer: Any,
                   out_dir: Path, echo: Callable[[str], None]) -> dict[str, Any]:
    """Train and evaluate one backbone with detectron2; the same result entry as the torchvision engine.
    `detector` is the command's resolved C4 configuration, so both engines build the same detector."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator
    from detectron2.utils.logger import setup_logger

    from mokd_eval.detection.train import Solver
    from mokd.core.resources import apply_resources

    if candidate.spec.stem != "imagenet" or candidate.spec.widths != (64, 128, 256, 512):
        raise MokdError(f"{candidate.key}: detectron2's ResNet needs a standard-width ImageNet-stem ResNet")
    out_dir.mkdir(parents=True, exist_ok=True)
    setup_logger(output=str(out_dir), name="detectron2", abbrev_name="d2")
    depth = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 50 if candidate.spec.bottleneck else 34, (3, 4, 23, 3): 101}[
        candidate.spec.layers]
    solver = Solver(iters=settings.iters, batch_size=settings.batch_size, lr=settings.lr,
                    warmup_iters=settings.warmup_iters, checkpoint_period=settings.checkpoint_period,
                    precise_bn_iters=settings.precise_bn_iters)
    exported = detectron2_state(candidate.module.state_dict())
    weights = out_dir / "backbone_detectron2.pkl"
    atomic.write_bytes(weights, pickle.dumps({"model": exported, "__author__": "mokd", "matching_heuristics": True}))
    train_set, val_set = _register_data(data, out_dir)
    workers = apply_resources(context.device.type, settings.num_workers).workers
    cfg = build_config(depth=depth, num_classes=len(data.category_ids), res5_head=settings.res5_head,
                       norm=settings.norm, world_size=context.world_size, weights=str(weights),
                       train_sets=(train_set,), test_sets=(val_set,), detector=detector, solver=solver,
                       output_dir=out_dir, device=str(context.device), num_workers=workers, seed=settings.seed,
                       precision=settings.precision)
    atomic.write_text(out_dir / "config.yaml", cfg.dump())

    class Trainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name):
            return COCOEvaluator(dataset_name, output_dir=str(out_dir / "inference"))

    training: dict[str, Any] = {"config_yaml": str(out_dir / "config.yaml")}
    if settings.eval_only:
        if settings.weights is None:
            raise MokdError("--eval-only needs --weights (a detectron2 model_final.pth)")
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model).load(str(settings.weights))
        start = time.perf_counter()
        with timer.stage("evaluate"):
            results = Trainer.test(cfg, model)
        report = {}
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=settings.resume)
        model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
        report = _load_report(model, exported) if not settings.resume else {}
        if report:
            echo(f"  {candidate.key}: detectron2 C4 ({cfg.MODEL.ROI_HEADS.NAME}, {cfg.MODEL.RESNETS.NORM}); trunk "
                 f"{report['trunk_loaded']}/{report['trunk_total']} tensors loaded, res5 "
                 f"{report['res5_loaded']}/{report['res5_total']}")
        start = time.perf_counter()
        with timer.stage("train"):
            trainer.train()  # ends with EvalHook's evaluation on the test set
        results = getattr(trainer, "_last_eval_results", None)
        training.update(weights=str(out_dir / "model_final.pth"),
                        iters_per_second=round(solver.iters / (time.perf_counter() - start), 4))
    metrics = {}
    for kind in ("bbox", "segm"):
        values = (results or {}).get(kind, {})
        metrics[kind] = {name: float(values.get(name, math.nan)) for name in METRICS}
    return {**candidate.record, "metrics": {"coco": json_safe(metrics)}, "engine": "detectron2",
            "load_report": report, "detector": {**detector.to_dict(), "roi_heads": cfg.MODEL.ROI_HEADS.NAME,
                                                "norm_layer": cfg.MODEL.RESNETS.NORM},
            "solver": solver.to_dict(), "training": training, "output_dir": str(out_dir)}
