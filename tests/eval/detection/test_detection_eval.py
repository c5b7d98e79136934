"""COCO evaluation on hand-made detections: perfect = 100, partial cases = pycocotools called directly,
and a closed form (half the objects found at precision 1 -> AP = 51/101)."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from mokd_eval.detection.coco_data import open_coco
from mokd_eval.detection.evaluation import evaluate, json_safe, to_coco_results


@pytest.fixture(scope="module")
def val():
    data = open_coco("shapes-coco:12:96")
    return data.val, data.category_ids


def _ground_truth_detections(split, category_ids, image_id: int) -> dict[str, torch.Tensor]:
    """The annotations of one image as detector output: xyxy boxes, labels 1..K, mask probabilities."""
    anns = split.coco.imgToAnns[image_id]
    boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], dtype=torch.float64)
    labels = torch.tensor([category_ids.index(a["category_id"]) + 1 for a in anns])
    masks = torch.from_numpy(np.stack([split.coco.annToMask(a) for a in anns])).float()[:, None]
    return {"boxes": boxes, "scores": torch.ones(len(anns)), "labels": labels, "masks": masks}


def _all_results(split, category_ids) -> list[dict]:
    results = []
    for image_id in split.coco.getImgIds():
        results += to_coco_results(image_id, _ground_truth_detections(split, category_ids, image_id), category_ids)
    return results


def test_perfect_predictions_score_100(val):
    split, category_ids = val
    metrics = evaluate(split.coco, _all_results(split, category_ids))
    for kind in ("bbox", "segm"):
        assert metrics[kind]["AP"] == pytest.approx(100.0)
        assert metrics[kind]["AP50"] == pytest.approx(100.0)
        assert metrics[kind]["AP75"] == pytest.approx(100.0)
        assert math.isnan(metrics[kind]["APl"])  # no object above 96^2 px in 96 px images
    assert json_safe(metrics)["bbox"]["APl"] is None


def test_results_use_coco_ids_xywh_and_fortran_rle(val):
    split, category_ids = val
    image_id = split.coco.getImgIds()[0]
    detection = _ground_truth_detections(split, category_ids, image_id)
    results = to_coco_results(image_id, detection, category_ids)
    anns = split.coco.imgToAnns[image_id]
    assert [r["category_id"] for r in results] == [a["category_id"] for a in anns]
    assert set(category_ids) == {10, 20, 30}
    for result, ann in zip(results, anns):
        assert result["bbox"] == pytest.approx(ann["bbox"])
        assert isinstance(result["segmentation"]["counts"], str)
        decoded = mask_utils.decode({**result["segmentation"], "counts": result["segmentation"]["counts"].encode()})
        assert np.array_equal(decoded, split.coco.annToMask(ann))


def test_first_half_of_each_category_at_precision_one_matches_closed_form(val):
    """The first ceil(n/2) objects of each category detected exactly, nothing else: precision is 1 up to
    recall k/n, so AP = (#COCO recall thresholds <= k/n) / 101 at every IoU threshold, averaged over the
    categories that have objects."""
    split, category_ids = val
    kept, seen = [], {}
    totals = {cat: len(split.coco.getAnnIds(catIds=[cat])) for cat in category_ids}
    for result in _all_results(split, category_ids):
        cat = result["category_id"]
        seen[cat] = seen.get(cat, 0) + 1
        if seen[cat] <= math.ceil(totals[cat] / 2):
            kept.append(result)
    thresholds = np.linspace(0.0, 1.0, 101)  # pycocotools' recall grid
    present = [n for n in totals.values() if n]  # COCOeval leaves categories without objects out of the mean
    expected = np.mean([np.sum(thresholds <= math.ceil(n / 2) / n) / 101 for n in present]) * 100
    metrics = evaluate(split.coco, kept, iou_types=("bbox",))
    assert metrics["bbox"]["AP50"] == pytest.approx(expected)
    assert metrics["bbox"]["AP"] == pytest.approx(expected)
    assert 50 < expected < 100


def _direct_cocoeval(coco_gt, results, iou_type):
    """pycocotools used directly, the way its README shows."""
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v * 100) if v >= 0 else math.nan for v in evaluator.stats[:6]]


def test_partial_detections_agree_with_pycocotools(val):
    split, category_ids = val
    rng = np.random.default_rng(0)
    results = []
    for image_id in split.coco.getImgIds():
        detection = _ground_truth_detections(split, category_ids, image_id)
        n = len(detection["boxes"])
        detection["boxes"] = detection["boxes"] + torch.from_numpy(rng.normal(0, 3, size=(n, 4)))
        detection["scores"] = torch.from_numpy(rng.uniform(0.1, 1, size=n)).float()
        detection["masks"] = torch.roll(detection["masks"], shifts=int(rng.integers(-3, 4)), dims=-1)
        keep = torch.from_numpy(rng.uniform(size=n) < 0.7)
        false = {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]], dtype=torch.float64), "scores": torch.tensor([0.5]),
                 "labels": torch.tensor([1]), "masks": torch.zeros(1, 1, 96, 96)}
        false["masks"][0, 0, 5:40, 5:30] = 0.9
        kept = {k: v[keep] for k, v in detection.items()}
        results += to_coco_results(image_id, kept, category_ids) + to_coco_results(image_id, false, category_ids)
    ours = evaluate(split.coco, results)
    bbox_direct = _direct_cocoeval(split.coco, [{k: v for k, v in r.items() if k != "segmentation"} for r in results],
                                   "bbox")
    segm_direct = _direct_cocoeval(split.coco, [{k: v for k, v in r.items() if k != "bbox"} for r in results], "segm")
    for direct, kind in ((bbox_direct, "bbox"), (segm_direct, "segm")):
        mine = list(ours[kind].values())
        assert np.allclose(mine, direct, equal_nan=True)
        assert 0 < mine[0] < 100


def test_no_detections_is_nan():
    data = open_coco("shapes-coco:4:64")
    metrics = evaluate(data.val.coco, [])
    assert all(math.isnan(v) for kind in metrics.values() for v in kind.values())
