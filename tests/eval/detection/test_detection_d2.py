"""The detectron2 engine: runs only where detectron2 is importable (an optional extra, built from source)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

import mokd.cli as cli
from mokd.core.checkpoints import load_backbones
from mokd_eval.detection.model import DetectorConfig, build_detector
from mokd.core.registry import ALIASES

pytestmark = pytest.mark.detectron2  # the optional engine, where it imports

pytest.importorskip("detectron2", reason="detectron2 is not installed (optional engine, built from source)")

TINY = ["--data", "shapes-coco:4:64", "--engine", "detectron2", "--batch-size", "2", "--rois-per-image", "8",
        "--test-proposals", "10", "--precise-bn-iters", "1", "--num-workers", "0", "--iters", "3"]


def _run(tmp_path, checkpoint, *extra):
    out = tmp_path / "res.json"
    result = CliRunner().invoke(cli.mokd_eval, ["coco", str(checkpoint), "--backbone", "r18", *TINY,
                                                "--output-dir", str(tmp_path / "det"), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())["results"][0], result.output


def test_native_head_loads_every_trunk_and_res5_tensor_in_detectron2(tmp_path, checkpoint_factory, tiny_vit_spec):
    path, _ = checkpoint_factory.mokd_native(ALIASES["r18"], tiny_vit_spec)
    entry, output = _run(tmp_path, path)
    assert entry["engine"] == "detectron2" and entry["key"] == "teacher1"
    report = entry["load_report"]
    assert report["trunk_loaded"] == report["trunk_total"] == 75  # 90 tensors minus 15 num_batches_tracked
    assert report["res5_loaded"] == report["res5_total"] == report["res5_in_checkpoint"] == 25
    assert entry["detector"]["roi_heads"] == "MokdNativeRes5ExtraNorm" and entry["detector"]["norm_layer"] == "BN"
    assert set(entry["metrics"]["coco"]) == {"bbox", "segm"}
    assert entry["metrics"]["coco"]["bbox"]["AP"] is not None  # evaluated by detectron2's COCOEvaluator
    assert "engine detectron2" in output and (tmp_path / "det" / "teacher1" / "model_final.pth").is_file()


def test_stock_head_loads_what_our_d2_bottleneck_emulation_loads(tmp_path, checkpoint_factory, tiny_vit_spec):
    """detectron2's own name-and-shape matching and our emulation agree tensor for tensor on R18."""
    path, _ = checkpoint_factory.official_mokd(ALIASES["r18"], tiny_vit_spec)
    entry, _ = _run(tmp_path, path, "--key", "teacher_cnn", "--res5-head", "d2-bottleneck", "--norm", "frozenbn")
    assert entry["detector"]["roi_heads"] == "Res5ROIHeads" and entry["detector"]["norm_layer"] == "FrozenBN"
    loaded = load_backbones(path, key="teacher_cnn")[0]
    ours = build_detector(loaded.module, dataclasses.replace(DetectorConfig(num_classes=3), res5_head="d2-bottleneck"),
                          loaded.checkpoint.entries["teacher_cnn"].backbone_state)[1]
    loaded_batchnorms = 5  # block 0: bn1, bn2, shortcut norm; block 1: bn1, bn2 (num_batches_tracked each)
    assert entry["load_report"]["res5_loaded"] == ours.res5_loaded - loaded_batchnorms == 23
    assert entry["load_report"]["trunk_loaded"] == entry["load_report"]["trunk_total"]
