"""Issue 18, class 1: inputs the user controls never end in a traceback. Bad folder entries met while scanning
(link loops, dangling links), decompression bombs, broken COCO annotations, damaged resume files, an out-of-range
--feature and a directory given as --config are one line naming the file or option, exit 2, nothing overwritten;
with --skip-bad-images the bad folder entries are skipped and counted like unreadable images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mokd.cli import mokd_eval, mokd_train
from mokd.core.checkpoints import load_resume_state
from mokd_eval.detection.coco_data import open_coco
from mokd.core.errors import MokdError
from mokd.core.features import FeatureKind, feature_function
from mokd.core.registry import build_backbone

EARLIER = b'{"earlier": "results"}\n'


def image_folder(root: Path, per_class: int = 3, classes: str = "ab") -> Path:
    for split in ("train", "val"):
        for index, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for item in range(per_class):
                pixels = np.full((32, 32, 3), 60 * index + 10 * item, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{item}.png")
    return root


def run_knn(checkpoint: Path, data: Path, out: Path, *extra: str):
    return CliRunner().invoke(mokd_eval, ["knn", str(checkpoint), "--data", f"imagefolder:{data}", "--k", "1",
                                         "--no-cache", "--num-workers", "0", "--out", str(out), *extra])


def assert_one_line_error(result, *names: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    assert result.output.count("error: ") == 1, result.output  # a progress bar may share the error's line
    error = result.output.split("error: ")[-1].splitlines()[0]
    assert all(name in error for name in names), result.output


@pytest.mark.parametrize("make_bad", [
    lambda folder: os.symlink(folder / "missing.png", folder / "dangling.png"),
    lambda folder: os.symlink("self.png", folder / "self.png"),
])
def test_broken_links_in_a_folder_are_named_or_skipped_and_counted(tmp_path, checkpoint_factory, tiny_cnn_spec,
                                                                   make_bad):
    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    data = image_folder(tmp_path / "data")
    make_bad(data / "val" / "b")
    bad = sorted(name for name in os.listdir(data / "val" / "b") if os.path.islink(data / "val" / "b" / name))[0]
    out = tmp_path / "knn.json"
    out.write_bytes(EARLIER)
    result = run_knn(path, data, out)
    assert_one_line_error(result, str(data / "val" / "b" / bad), "--skip-bad-images")
    assert out.read_bytes() == EARLIER
    result = run_knn(path, data, out, "--skip-bad-images")
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable images" in result.output
    assert json.loads(out.read_text())["dataset"]["val_images"] == 7  # 6 images + the broken link, skipped


def test_a_decompression_bomb_is_an_unreadable_image(tmp_path, monkeypatch, checkpoint_factory, tiny_cnn_spec):
    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    data = image_folder(tmp_path / "data")
    Image.fromarray(np.zeros((256, 256, 3), dtype=np.uint8)).save(data / "val" / "a" / "bomb.png")
    # 256 x 256 is over twice the limit (PIL's error, not only a warning); the 224 px crops stay below it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)
    out = tmp_path / "knn.json"
    result = run_knn(path, data, out)
    assert_one_line_error(result, "bomb.png", "decompression-bomb", "--skip-bad-images")
    assert not out.exists()
    result = run_knn(path, data, out, "--skip-bad-images")
    assert result.exit_code == 0 and "skipped 1 unreadable images" in result.output, result.output


def coco_root(tmp_path: Path, changes: dict, drop: str | None) -> Path:
    """A one-image COCO root whose train annotations hold a good annotation and annotation 7, changed."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir()
        Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(root / f"{split}2017" / "1.png")
        good = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0,
                "segmentation": [[1, 1, 6, 1, 6, 6]]}
        bad = {key: value for key, value in {**good, "id": 7, **changes}.items() if key != drop}
        dataset = {"images": [{"id": 1, "file_name": "1.png", "height": 16, "width": 16}],
                   "categories": [{"id": 1, "name": "thing"}],
                   "annotations": [good, bad] if split == "train" else [good]}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(dataset))
    return root


@pytest.mark.parametrize("changes,drop,message", [
    ({"segmentation": [[1, 1, 6, 1]]}, None, "polygon"),
    ({"category_id": 9}, None, "category_id 9"),
    ({}, "segmentation", "no segmentation"),
    ({"bbox": [1, 1, float("nan"), 5]}, None, "bbox"),
])
def test_broken_coco_annotations_are_named_when_read(tmp_path, changes, drop, message):
    root = coco_root(tmp_path, changes, drop)
    with pytest.raises(MokdError, match=message) as caught:
        open_coco(str(root))
    assert "instances_train2017.json: annotation id 7" in str(caught.value) and "\n" not in str(caught.value)
    result = CliRunner().invoke(mokd_eval, ["coco", "--backbone", "r18", "--data", str(root), "--iters", "1",
                                            "--out", str(tmp_path / "coco.json")])
    assert_one_line_error(result, "annotation id 7")
    assert not (tmp_path / "coco.json").exists()


def test_damaged_or_foreign_resume_files_are_one_line_errors(tmp_path):
    keys = {"epoch", "history"}
    good = tmp_path / "good.pth"
    torch.save({"epoch": 1, "history": []}, good)
    assert load_resume_state(good, keys)["epoch"] == 1
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:40])
    foreign = tmp_path / "foreign.pth"
    torch.save({"epoch": 1, "history": [], "path": Path("x")}, foreign)
    stranger = tmp_path / "stranger.pth"
    torch.save({"weights": torch.zeros(1)}, stranger)
    for path, reason in ((truncated, "truncated or corrupted"), (foreign, "Python global pathlib"),
                         (stranger, "lacks epoch, history")):
        with pytest.raises(MokdError, match=reason) as caught:
            load_resume_state(path, keys)
        assert str(path) in str(caught.value) and "delete it" in str(caught.value)


def test_a_truncated_linear_resume_file_stops_the_command_in_one_line(tmp_path, checkpoint_factory, tiny_cnn_spec):
    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    out = tmp_path / "linear.json"
    run_dir = tmp_path / "linear" / "teacher" / "final"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pth").write_bytes(b"PK\x03\x04 truncated")
    before = (run_dir / "checkpoint.pth").read_bytes()
    result = CliRunner().invoke(mokd_eval, ["linear", str(path), "--data", "shapes:50", "--epochs", "1",
                                            "--num-workers", "0", "--resume", "--out", str(out)])
    assert_one_line_error(result, str(run_dir / "checkpoint.pth"), "drop --resume")
    assert (run_dir / "checkpoint.pth").read_bytes() == before and not out.exists()


def test_last_cls_beyond_the_depth_names_the_option(tiny_vit_spec):
    backbone = build_backbone(tiny_vit_spec)
    with pytest.raises(MokdError, match=r"--feature last_cls:99: .* has 12 blocks; use last_cls:1 to last_cls:12"):
        feature_function(backbone, tiny_vit_spec, FeatureKind.parse("last_cls:99"))
    assert feature_function(backbone, tiny_vit_spec, FeatureKind.parse("last_cls:12")) is not None


@pytest.mark.parametrize("make,message", [(lambda p: p.mkdir(), "is a directory"),
                                          (lambda p: p.write_bytes(b"\xff\xfe\x00bad"), "cannot be read"),
                                          (lambda p: None, "does not exist")])
def test_mokd_train_config_that_is_not_a_yaml_file(tmp_path, make, message):
    config = tmp_path / "config"
    make(config)
    result = CliRunner().invoke(mokd_train, ["--config", str(config), "--output-dir", str(tmp_path / "run")])
    assert_one_line_error(result, f"--config {config}", message)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # fine-tunes
@pytest.mark.parametrize("command", [["semisup", "--percent", "10", "--mode", "finetune"],
                                     ["cifar", "--dataset", "cifar10"], ["linear", "--mode", "protocol"]])
def test_training_protocols_skip_and_count_the_unreadable_images(tmp_path, checkpoint_factory, tiny_cnn_spec,
                                                                 command):
    """The fine-tuning loop and its evaluation drop unreadable images (--skip-bad-images) instead of failing to
    collate them, and count them: per epoch in the history, and in the metrics of the evaluation."""
    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    data = image_folder(tmp_path / "data", per_class=4)
    for split in ("train", "val"):
        (data / split / "a" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "result.json"
    args = [*command, str(path), "--data", f"imagefolder:{data}", "--epochs", "1", "--batch-size", "4",
            "--num-workers", "0", "--image-size", "32", "--out", str(out)]
    result = CliRunner().invoke(mokd_eval, args)
    assert_one_line_error(result, "broken.png", "--skip-bad-images")
    assert not out.exists()
    result = CliRunner().invoke(mokd_eval, [*args, "--skip-bad-images"])
    assert result.exit_code == 0, result.output
    record, = json.loads(out.read_text())["results"]
    metrics, = record["metrics"].values()
    assert metrics["skipped_images"] == 1  # the val split's broken image
    if command[0] != "semisup":  # the 10 % subset may leave the broken training image out
        assert [epoch["skipped_images"] for epoch in record["protocol"]["history"]] == [1]
