"""COCO bbox/segm evaluation exactly as detectron2's COCOEvaluator reports it (pycocotools COCOeval).

Detections are converted to COCO results: contiguous labels back to the sorted category ids, boxes as
[x, y, w, h], masks binarised at >= 0.5 and RLE-encoded in Fortran order with `counts` as str; the segm
evaluation drops `bbox` so pycocotools derives areas from the masks. Metrics are `stats[0:6] x 100`
(-1, i.e. no such objects, becomes NaN).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")


def to_coco_results(image_id: int, detection: dict[str, torch.Tensor], category_ids: Sequence[int]) -> list[dict]:
    """COCO result dicts for one image's detections (`boxes` xyxy, `scores`, `labels` 1..K, optional
    `masks` N x 1 x H x W probabilities)."""
    boxes = detection["boxes"].detach().cpu().double()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = detection["scores"].detach().cpu().tolist()
    labels = detection["labels"].detach().cpu().tolist()
    rles = []
    if "masks" in detection:
        binary = (detection["masks"].detach().cpu()[:, 0] >= 0.5).numpy().astype(np.uint8)
        for mask in binary:
            rle = mask_utils.encode(np.asfortranarray(mask[:, :, None]))[0]
            rle["counts"] = rle["counts"].decode("utf-8")
            rles.append(rle)
    results = []
    for index, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        result = {"image_id": int(image_id), "category_id": int(category_ids[label - 1]), "bbox": box,
                  "score": float(score)}
        if rles:
            result["segmentation"] = rles[index]
        results.append(result)
    return results


def _nan_metrics() -> dict[str, float]:
    return {name: math.nan for name in METRICS}


def evaluate(coco_gt: COCO, results: list[dict[str, Any]], iou_types: Sequence[str] = IOU_TYPES,
             image_ids: Sequence[int] | None = None) -> dict[str, dict[str, float]]:
    """{iou_type: {AP, AP50, AP75, APs, APm, APl}} in percent; NaN throughout when there is no detection."""
    metrics = {}
    for iou_type in iou_types:
        typed = copy.deepcopy(results)
        if iou_type == "segm":
            typed = [r for r in typed if "segmentation" in r]
            for result in typed:
                result.pop("bbox", None)
        if not typed:
            metrics[iou_type] = _nan_metrics()
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
            coco_dt = coco_gt.loadRes(typed)
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = list(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics[iou_type] = {name: float(value * 100) if value >= 0 else math.nan
                             for name, value in zip(METRICS, evaluator.stats[:6])}
    return metrics


def json_safe(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """NaN is not JSON: write it as null."""
    return {kind: {name: None if math.isnan(value) else round(value, 4) for name, value in values.items()}
            for kind, values in metrics.items()}
