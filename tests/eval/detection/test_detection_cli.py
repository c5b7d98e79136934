"""`mokd-eval coco` end to end through click (torchvision engine, tiny settings), resume, eval-only and
one-line errors; shapes-coco and the COCO folder layout."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import mokd.cli as cli
from mokd_eval.detection import shapes_coco
from mokd_eval.detection.coco_data import DetectionDataset, open_coco
from mokd.core.errors import MokdError
from mokd.core.registry import ALIASES

pytestmark = pytest.mark.slow  # trains the detector end to end

TINY = ["--data", "shapes-coco:4:64", "--engine", "torchvision", "--batch-size", "2", "--rois-per-image", "8",
        "--test-proposals", "10", "--precise-bn-iters", "1", "--num-workers", "0"]


def _coco(*args: str):
    return CliRunner().invoke(cli.mokd_eval, ["coco", *args])


def test_scratch_run_end_to_end(tmp_path):
    out = tmp_path / "scratch.json"
    result = _coco("--backbone", "r18", *TINY, "--iters", "2", "--output-dir", str(tmp_path / "det"),
                   "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "random initialisation ('scratch' control)" in result.output
    assert "r18, scratch" in result.output and "APb50" in result.output
    payload = json.loads(out.read_text())
    entry = payload["results"][0]
    assert entry["key"] == "scratch" and entry["init"] == "scratch" and entry["checkpoint"] is None
    assert set(entry["metrics"]["coco"]) == {"bbox", "segm"}
    assert set(entry["metrics"]["coco"]["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert entry["solver"]["steps"] == [1, 2] and entry["training"]["iterations_run"] == 2
    assert payload["protocol"]["engine"] == "torchvision" and payload["dataset"]["category_ids"] == [10, 20, 30]
    assert payload["protocol"]["res5_head"] == "d2-bottleneck" and payload["protocol"]["iters"] == 2  # A.5's head
    assert entry["protocol"]["res5_from_checkpoint"] == 0 and entry["protocol"]["res5_initialised"] > 0
    assert payload["protocol"]["paper"] is False and "iters" in payload["protocol"]["differs"]
    assert (tmp_path / "det" / "scratch" / "detector_final.pt").is_file()


def test_checkpoint_run_resume_and_eval_only(tmp_path, checkpoint_factory, tiny_vit_spec):
    path, _ = checkpoint_factory.mokd_native(ALIASES["r18"], tiny_vit_spec)
    det = tmp_path / "det"
    common = ["--backbone", "r18", *TINY, "--output-dir", str(det), "--checkpoint-period", "1", "--res5-head", "native"]
    first = _coco(str(path), *common, "--iters", "1", "--out", str(tmp_path / "a.json"))
    assert first.exit_code == 0, first.output
    assert "teacher1: C4 detector (native res5, syncbn); trunk 90/90 tensors loaded (0 missing); res5 30/30" \
        in first.output
    recorded = json.loads((tmp_path / "a.json").read_text())["results"][0]["protocol"]
    assert (recorded["res5_from_checkpoint"], recorded["res5_initialised"]) == (30, 0)
    assert "res5_head" in recorded["differs"] and "30/0" in first.output
    saved = torch.load(det / "teacher1" / "detector_last.pt", weights_only=True)
    assert saved["iteration"] == 1 and saved["categories"] == [10, 20, 30]
    second = _coco(str(path), *common, "--iters", "2", "--resume", "--out", str(tmp_path / "b.json"))
    assert second.exit_code == 0, second.output
    assert "at iteration 1" in second.output
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["training"]["iterations_run"] == 1
    weights = det / "teacher1" / "detector_final.pt"
    third = _coco(str(path), *common, "--eval-only", "--weights", str(weights), "--out", str(tmp_path / "c.json"))
    assert third.exit_code == 0, third.output
    evaluated = json.loads((tmp_path / "c.json").read_text())["results"][0]["metrics"]["coco"]
    trained = json.loads((tmp_path / "b.json").read_text())["results"][0]["metrics"]["coco"]
    assert evaluated == trained  # the saved detector reproduces the evaluation exactly
    other = _coco(str(path), "--backbone", "r18", "--data", str(_other_categories(tmp_path)),
                  "--engine", "torchvision", "--eval-only", "--weights", str(weights), "--num-workers", "0")
    assert other.exit_code == 2 and "trained on categories [10, 20, 30]" in other.output


def _other_categories(tmp_path):
    root = shapes_coco.write_shapes_coco(tmp_path / "other", 2, 64)
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}2017.json"
        data = json.loads(path.read_text())
        data["categories"].append({"id": 99, "name": "extra"})
        path.write_text(json.dumps(data))
    return root


def test_backbone_must_match_the_checkpoint(checkpoint_factory, tiny_vit_spec):
    path, _ = checkpoint_factory.mokd_native(ALIASES["r18"], tiny_vit_spec)
    result = _coco(str(path), "--backbone", "r34", *TINY, "--iters", "1")
    assert result.exit_code == 2
    assert "--backbone r34 does not match" in result.output and "'teacher1' = r18" in result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1
    assert "Traceback" not in result.output


def test_coco_folder_layout_and_errors(tmp_path):
    root = shapes_coco.write_shapes_coco(tmp_path / "coco", 6, 64)
    from_disk, generated = open_coco(str(root)), open_coco("shapes-coco:6:64")
    assert from_disk.category_ids == generated.category_ids == [10, 20, 30]
    first = DetectionDataset(from_disk.train, from_disk.category_ids, train=False)[0]
    same = DetectionDataset(generated.train, generated.category_ids, train=False)[0]
    assert torch.equal(first[0], same[0]) and torch.equal(first[1]["masks"], same[1]["masks"])
    with pytest.raises(MokdError, match="instances_train2017.json does not exist"):
        open_coco(str(tmp_path))
    bad = root / "annotations" / "instances_val2017.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(MokdError, match="is not a COCO instances file"):
        open_coco(str(root))
    bad.write_text("{not json")
    with pytest.raises(MokdError, match="cannot be read as JSON"):
        open_coco(str(root))
    with pytest.raises(MokdError, match="shapes-coco"):
        open_coco("shapes-coco:abc")


def test_training_set_drops_crowd_and_empty_images(tmp_path):
    root = shapes_coco.write_shapes_coco(tmp_path / "coco", 4, 64)
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    first_image = data["images"][0]["id"]
    for ann in data["annotations"]:
        if ann["image_id"] == first_image:
            ann["iscrowd"] = 1
    path.write_text(json.dumps(data))
    coco = open_coco(str(root))
    train = DetectionDataset(coco.train, coco.category_ids, train=True)
    assert first_image not in train.ids and len(train.ids) == 3
    evaluation = DetectionDataset(coco.train, coco.category_ids, train=False)
    image, target = evaluation[evaluation.ids.index(first_image)]
    assert len(target["boxes"]) == 0 and target["masks"].shape == (0, 64, 64)


def test_shapes_coco_is_seeded_and_polygons_match_pixels():
    a, pixels_a = shapes_coco.generate_shapes_coco(5, 64)
    b, pixels_b = shapes_coco.generate_shapes_coco(5, 64)
    assert a == b and all((x == y).all() for x, y in zip(pixels_a, pixels_b))
    val, _ = shapes_coco.generate_shapes_coco(5, 64, split="val")
    assert val["annotations"] != a["annotations"]
    assert {ann["category_id"] for ann in a["annotations"]} <= {10, 20, 30}
    assert all(1 <= sum(1 for ann in a["annotations"] if ann["image_id"] == img["id"]) <= 3 for img in a["images"])
