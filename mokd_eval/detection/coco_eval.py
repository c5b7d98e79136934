"""`mokd-eval coco`: C4 Mask R-CNN transfer of a checkpoint's ResNet (or a random 'scratch' control) to COCO,
reported as a Table-6 row. Two engines: this project's torchvision rebuild and, where importable, detectron2.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mokd_eval.detection import evaluation
from mokd_eval.detection.coco_data import CocoData, DetectionDataset, open_coco
from mokd_eval.detection.model import DetectorConfig, build_detector
from mokd_eval.detection.train import (FINAL_WEIGHTS, PAPER_SCHEDULE, REFERENCE_BATCH, SCHEDULES, Solver,
                                       check_categories, evaluate_detector, load_detector_file, precise_bn,
                                       train_detector)
from mokd.core.distributed import DistContext
from mokd.core.errors import MokdError
from mokd.core.pipeline import load_models
from mokd_eval.protocols import PAPER_PRECISION, paper_verdict, verdict_line
from mokd.core.registry import ArchSpec, build_backbone, resolve_arch
from mokd.core.resources import apply_resources
from mokd.core.results import StageTimer, build_results, format_table

BACKBONES = ("r18", "r34", "r50", "r101")
ENGINES = ("auto", "torchvision", "detectron2")
SCRATCH = "scratch"
COCO_TRAIN_SIZES = (600, 800)
COCO_TEST_SIZE = 800
MAX_SIZE = 1333
# shapes-coco has at most 3 objects per small image: fewer images, RoIs and proposals keep a CPU run to minutes.
SHAPES_BATCH = 4
SHAPES_ROIS_PER_IMAGE = 32
SHAPES_TEST_PROPOSALS = 50
COCO_BATCH = 16
PRECISE_BN_ITERS = 200
# A.5 "Our implementation is based on detectron2": its stock Res5ROIHeads builds Bottleneck blocks whatever the
# depth, so the R18/R34 detectors behind Table 6 have that head; `native` (the backbone's own layer4) is another.
PAPER_RES5_HEAD = "d2-bottleneck"
RES5_HEADS = ("d2-bottleneck", "native")
# A.5 follows MoCo [15]: SyncBN in the backbone and the heads.
PAPER_NORM = "syncbn"


def detectron2_available() -> bool:
    return importlib.util.find_spec("detectron2") is not None


def resolve_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise MokdError(f"--engine {engine!r}: use one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "detectron2" if detectron2_available() else "torchvision"
    if engine == "detectron2" and not detectron2_available():
        raise MokdError("--engine detectron2: detectron2 is not importable here; build it from source "
                        "(see README, 'mokd-eval coco') or use --engine torchvision")
    return engine


@dataclass
class CocoSettings:
    """Everything `mokd-eval coco` was asked to do, recorded in the results JSON."""

    backbone: str
    data: str
    engine: str = "auto"
    res5_head: str = PAPER_RES5_HEAD
    norm: str = PAPER_NORM
    iters: int = SCHEDULES[PAPER_SCHEDULE]
    batch_size: int | None = None  # None: 16 (COCO), 4 (shapes-coco)
    lr: float = 0.02
    warmup_iters: int = 1000
    train_sizes: tuple[int, int] | None = None  # None: COCO's (600, 800), shapes-coco's native size
    test_size: int | None = None
    max_size: int = MAX_SIZE
    rois_per_image: int | None = None  # None: 512 (detectron2); shapes-coco 64
    test_proposals: int | None = None  # None: 1000 (detectron2); shapes-coco 100
    precise_bn_iters: int | None = None  # None: 200, at most a tenth of the training iterations
    checkpoint_period: int = 5000
    output_dir: Path | None = None
    resume: bool = False
    tensorboard: bool = False  # losses and lr per iteration under <output dir>/tensorboard/
    eval_only: bool = False
    weights: Path | None = None
    key: str | None = None
    trust: bool = False
    num_workers: int | None = None
    seed: int = 0
    precision: str = PAPER_PRECISION

    def record(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class Candidate:
    """One backbone to transfer: its weights (or scratch), its spec and the tensors of the file."""

    key: str
    spec: ArchSpec
    module: nn.Module
    source: dict[str, torch.Tensor] | None
    record: dict[str, Any]


def _same_resnet(found: ArchSpec, wanted: ArchSpec) -> bool:
    return (not found.is_vit and (found.layers, found.bottleneck, found.widths, found.stem)
            == (wanted.layers, wanted.bottleneck, wanted.widths, wanted.stem))


def select_backbones(checkpoint: Path | None, settings: CocoSettings, echo: Callable[[str], None]) -> list[Candidate]:
    """The checkpoint's ResNets that are `--backbone` (all default models, or `--key`), or one scratch ResNet."""
    if settings.backbone not in BACKBONES:
        raise MokdError(f"--backbone {settings.backbone!r}: use one of {', '.join(BACKBONES)}")
    wanted = resolve_arch(settings.backbone)
    if checkpoint is None:
        torch.manual_seed(settings.seed)
        echo(f"no checkpoint: {settings.backbone} starts from random initialisation ('{SCRATCH}' control)")
        record = {"key": SCRATCH, "arch": wanted.name, "arch_spec": wanted.to_dict(), "checkpoint": None,
                  "init": SCRATCH}
        return [Candidate(SCRATCH, wanted, build_backbone(wanted), None, record)]
    loaded = load_models(checkpoint, model=None, key=settings.key, trust=settings.trust, echo=echo)
    chosen = [entry for entry in loaded if _same_resnet(entry.spec, wanted)]
    if not chosen:
        found = ", ".join(f"'{entry.key}' = {entry.spec.name}" for entry in loaded)
        raise MokdError(f"--backbone {settings.backbone} does not match {checkpoint} ({found}): pass the "
                        "checkpoint's ResNet as --backbone, or pick its ResNet model with --key")
    candidates = []
    for entry in chosen:
        file_state = entry.checkpoint.entries[entry.key].backbone_state
        record = {"key": entry.key, "arch": entry.spec.name, "arch_spec": entry.spec.to_dict(), "init": "checkpoint",
                  "checkpoint": {"path": str(entry.checkpoint.path), "sha256": entry.checkpoint.sha256,
                                 "format": entry.checkpoint.format, "epoch": entry.checkpoint.epoch}}
        candidates.append(Candidate(entry.key, entry.spec, entry.module, file_state, record))
    return candidates


def resolve_defaults(data: CocoData, settings: CocoSettings) -> CocoSettings:
    """Fill the settings left to the data: detectron2's values on COCO, lighter ones on shapes-coco."""
    shapes = data.native_size is not None
    return dataclasses.replace(
        settings,
        batch_size=settings.batch_size or (SHAPES_BATCH if shapes else COCO_BATCH),
        rois_per_image=settings.rois_per_image or (SHAPES_ROIS_PER_IMAGE if shapes else None),
        test_proposals=settings.test_proposals or (SHAPES_TEST_PROPOSALS if shapes else None),
        precise_bn_iters=(settings.precise_bn_iters if settings.precise_bn_iters is not None
                          else min(PRECISE_BN_ITERS, max(1, settings.iters // 10))))


def detector_config(data: CocoData, settings: CocoSettings) -> DetectorConfig:
    """detectron2's values; input sizes default to COCO's, or to the native size of shapes-coco."""
    native = data.native_size
    train_sizes = settings.train_sizes or ((native, native) if native else COCO_TRAIN_SIZES)
    test_size = settings.test_size or (native or COCO_TEST_SIZE)
    if train_sizes[0] > train_sizes[1] or min(train_sizes) < 32 or test_size < 32:
        raise MokdError(f"--train-sizes {train_sizes[0]},{train_sizes[1]} / --test-size {test_size}: sizes must be "
                        "at least 32 and given as LOW,HIGH")
    defaults = DetectorConfig(num_classes=len(data.category_ids))
    rois = settings.rois_per_image or defaults.rois_per_image
    proposals = settings.test_proposals or defaults.rpn_post_nms_topk[1]
    return dataclasses.replace(defaults, res5_head=settings.res5_head, norm=settings.norm,
                               train_sizes=tuple(train_sizes), test_size=test_size, max_size=settings.max_size,
                               rois_per_image=rois,
                               rpn_post_nms_topk=(defaults.rpn_post_nms_topk[0], proposals))


def _output_dir(settings: CocoSettings, checkpoint: Path | None, key: str) -> Path:
    root = settings.output_dir or Path("results") / "coco" / (checkpoint.stem if checkpoint else SCRATCH)
    return root / key


def _torchvision_run(candidate: Candidate, data: CocoData, settings: CocoSettings, context: DistContext,
                     timer: StageTimer, checkpoint: Path | None, echo: Callable[[str], None]) -> dict[str, Any]:
    config = detector_config(data, settings)
    model, report = build_detector(candidate.module, config, candidate.source)
    echo(f"  {candidate.key}: C4 detector ({config.res5_head} res5, {config.norm}); {report.describe()}")
    if candidate.source is not None and report.trunk_loaded != report.trunk_total:
        raise MokdError(f"{candidate.key}: only {report.trunk_loaded}/{report.trunk_total} trunk tensors came from "
                        "the checkpoint; this is a bug, please report it")
    out_dir = _output_dir(settings, checkpoint, candidate.key)
    workers = apply_resources(context.device.type, settings.num_workers).workers
    solver = Solver(iters=settings.iters, batch_size=settings.batch_size, lr=settings.lr,
                    warmup_iters=settings.warmup_iters, checkpoint_period=settings.checkpoint_period,
                    precise_bn_iters=settings.precise_bn_iters)
    training: dict[str, Any] = {}
    if settings.eval_only:
        if settings.weights is None:
            raise MokdError("--eval-only needs --weights DETECTOR.pt (a detector_final.pt written by mokd-eval coco)")
        payload = load_detector_file(settings.weights)
        check_categories(settings.weights, payload["categories"], data.category_ids)
        saved = DetectorConfig.from_dict(payload.get("config", config.to_dict()))
        model, _ = build_detector(candidate.module, dataclasses.replace(saved, test_size=config.test_size),
                                  candidate.source)
        try:
            model.load_state_dict(payload["model"], strict=True)
        except RuntimeError as error:
            raise MokdError(f"{settings.weights} does not fit a {candidate.spec.name} C4 detector "
                            f"({str(error).splitlines()[1][:160]}): give the same --backbone/--res5-head/--norm") \
                from None
        echo(f"  evaluating {settings.weights} (trained {payload.get('iteration')} iterations)")
    else:
        dataset = DetectionDataset(data.train, data.category_ids, train=True)
        extra = {"config": config.to_dict(), "backbone": candidate.key}
        with timer.stage("train"):
            training = train_detector(model, dataset, solver, output_dir=out_dir, categories=data.category_ids,
                                      context=context, seed=settings.seed, resume=settings.resume,
                                      num_workers=workers, extra=extra, echo=echo, precision=settings.precision,
                                      tensorboard=settings.tensorboard)
        if config.norm == "syncbn" and settings.precise_bn_iters > 0:
            with timer.stage("precise_bn"):
                precise_bn(model, dataset, settings.precise_bn_iters, max(1, settings.batch_size // context.world_size),
                           context.device, settings.seed, workers)
        if context.is_main:
            from mokd_eval.detection.train import TrainState, save_checkpoint

            state = TrainState(settings.iters, data.category_ids)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # final weights: no optimizer state needed
            save_checkpoint(out_dir / FINAL_WEIGHTS, model, optimizer, None, state, extra)
            training["weights"] = str(out_dir / FINAL_WEIGHTS)
    metrics: dict[str, Any] = {}
    if context.is_main:
        with timer.stage("evaluate"):
            metrics, rate = evaluate_detector(model, data.val, data.category_ids, context.device,
                                              desc=f"{candidate.key} eval", precision=settings.precision)
        training["eval_images_per_s"] = round(rate, 3) if math.isfinite(rate) else None
    context.barrier()
    return {**candidate.record, "metrics": {"coco": evaluation.json_safe(metrics)} if metrics else {},
            "engine": "torchvision", "load_report": report.to_dict(), "detector": config.to_dict(),
            "solver": solver.to_dict(), "training": training, "output_dir": str(out_dir)}


def run_coco(checkpoint: Path | None, settings: CocoSettings, context: DistContext,
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Transfer every selected backbone and return the results payload (not yet written)."""
    engine = resolve_engine(settings.engine)
    if settings.engine == "auto":
        echo(f"engine: {engine} ({'importable' if engine == 'detectron2' else 'detectron2 not importable'})")
    timer = StageTimer()
    with timer.stage("load"):
        data = open_coco(settings.data)
        echo(f"data: {data.text} ({len(data.train.coco.getImgIds())} train / {len(data.val.coco.getImgIds())} val "
             f"images, {len(data.category_ids)} categories)")
        candidates = select_backbones(checkpoint, settings, echo)
        settings = resolve_defaults(data, settings)
    results = []
    for candidate in candidates:
        if engine == "detectron2":
            from mokd_eval.detection.d2_engine import run_detectron2

            results.append(run_detectron2(candidate, data, settings, detector_config(data, settings), context,
                                          timer, _output_dir(settings, checkpoint, candidate.key), echo))
        else:
            results.append(_torchvision_run(candidate, data, settings, context, timer, checkpoint, echo))
    protocol = {"name": "coco-c4-mask-rcnn", **coco_protocol(data, settings, engine),
                "metrics": "pycocotools COCOeval bbox/segm stats[0:6] x 100, as detectron2's COCOEvaluator",
                "reference": "MOKD Table 6; detectron2 R-C4 with MoCo's transfer config"}
    for entry in results:
        entry["protocol"] = {**protocol, **res5_origin(entry.get("load_report") or {})}
    config = {"checkpoint": str(checkpoint) if checkpoint else None, **settings.record()}
    return build_results(command="coco", protocol=protocol, dataset=data.record(), results=results,
                         timings=timer.as_dict(), seed=settings.seed, config=config)


def coco_protocol(data: CocoData, settings: CocoSettings, engine: str) -> dict[str, Any]:
    """The detector's protocol record, compared with A.5's: 2x schedule (180k iterations), lr 0.02 at 16 images,
    train short side [600, 800], test 800, detectron2's stock res5 head, MoCo's SyncBN, fp32."""
    detector = detector_config(data, settings)
    schedule = next((name for name, iters in SCHEDULES.items() if iters == settings.iters), "custom")
    record = {"command": "coco", "engine": engine, "res5_head": settings.res5_head, "norm": settings.norm,
              "schedule": schedule, "iters": settings.iters, "lr_per_16": settings.lr,
              "lr": settings.lr * settings.batch_size / REFERENCE_BATCH, "global_batch": settings.batch_size,
              "train_sizes": list(detector.train_sizes), "test_size": detector.test_size,
              "precision": settings.precision}
    reference = {"iters": SCHEDULES[PAPER_SCHEDULE], "res5_head": PAPER_RES5_HEAD, "norm": PAPER_NORM,
                 "lr_per_16": 0.02, "global_batch": COCO_BATCH, "train_sizes": list(COCO_TRAIN_SIZES),
                 "test_size": COCO_TEST_SIZE, "precision": PAPER_PRECISION}
    return paper_verdict(record, reference)


def res5_origin(load_report: dict[str, Any]) -> dict[str, Any]:
    """How many res5 tensors came from the checkpoint and how many were initialised (none known: empty)."""
    if "res5_total" not in load_report:
        return {}
    loaded = 0 if load_report.get("scratch") else int(load_report.get("res5_loaded", 0))
    return {"res5_from_checkpoint": loaded, "res5_initialised": int(load_report["res5_total"]) - loaded}


def _cell(value: float | None) -> str:
    return "nan" if value is None else f"{value:.1f}"


def _res5_cell(protocol: dict[str, Any]) -> str:
    if "res5_initialised" not in protocol:
        return "?"
    return f"{protocol['res5_from_checkpoint']}/{protocol['res5_initialised']}"


def coco_table(payload: dict[str, Any]) -> str:
    """Table 6 of the paper: AP^b, AP^b50, AP^b75, AP^m, AP^m50, AP^m75, then small/medium/large."""
    headers = ["model", "APb", "APb50", "APb75", "APm", "APm50", "APm75", "APbS", "APbM", "APbL", "APmS", "APmM",
               "APmL", "res5 loaded/init"]
    rows = []
    for entry in payload["results"]:
        coco = entry["metrics"].get("coco", {})
        box, mask = coco.get("bbox", {}), coco.get("segm", {})
        label = f"{entry['key']} ({entry['arch']}{', scratch' if entry.get('init') == SCRATCH else ''})"
        rows.append([label] + [_cell(box.get(m)) for m in ("AP", "AP50", "AP75")]
                    + [_cell(mask.get(m)) for m in ("AP", "AP50", "AP75")]
                    + [_cell(box.get(m)) for m in ("APs", "APm", "APl")]
                    + [_cell(mask.get(m)) for m in ("APs", "APm", "APl")] + [_res5_cell(entry.get("protocol") or {})])
    protocol = payload["protocol"]
    title = (f"COCO C4 Mask R-CNN on {payload['dataset']['spec']} (engine {protocol['engine']}, "
             f"res5 {protocol['res5_head']}, {protocol['norm']}, {protocol['iters']:,} iterations, "
             f"{protocol['precision']}; b = box, m = mask)")
    return f"{format_table(headers, rows, title=title)}\n{verdict_line(protocol)}"
