"""`mokd-eval linear`, `semisup` and `cifar` end to end through click's test runner (tiny data, 1 epoch)."""

import argparse
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mokd.cli import mokd_eval
from checkpoint_files import network_state, prefixed
from mokd.core.data import eval_transform, open_dataset, parse_data_spec
from mokd.core.features import feature_function
from mokd_eval.finetune import topk_counts
from mokd_eval.linear import load_head, protocol_feature
from mokd.core.registry import ALIASES, build_backbone

pytestmark = pytest.mark.slow  # trains probes and fine-tunes end to end

FAST = ["--num-workers", "0", "--device", "cpu", "--epochs", "1"]
CNN = ALIASES["r_tiny"]


def run(args, expect=0):
    result = CliRunner().invoke(mokd_eval, [str(arg) for arg in args])
    assert result.exit_code == expect, result.output
    return result


def one_line_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def timm_init_dino(path: Path) -> Path:
    """A DINO-layout checkpoint of a timm-initialised r_tiny: features that carry information."""
    torch.manual_seed(0)
    model = build_backbone(CNN).eval()
    state = prefixed(network_state(model, CNN), "module.")
    torch.save({"teacher": state, "student": state, "epoch": 1,
                "args": argparse.Namespace(arch="resnet_tiny", patch_size=16, out_dim=32)}, path)
    return path


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def contract(payload: dict, command: str, keys: list[str]) -> None:
    assert payload["command"] == command and payload["seed"] == 0
    assert [entry["key"] for entry in payload["results"]] == keys
    assert payload["environment"]["versions"]["torch"] and payload["timings"]
    for entry in payload["results"]:
        assert len(entry["checkpoint"]["sha256"]) == 64
        metrics = entry["metrics"][command]
        assert 0 <= metrics["top1"] <= metrics["top5"] <= 100
        for field in ("mode", "epochs", "lr_chosen", "batch_size", "image_size"):
            assert field in entry["protocol"], field


def direct_top1(head_path: Path, backbone, spec, data: str) -> float:
    """Accuracy of a saved head on features computed here from the source backbone (not the loaded one)."""
    head, meta = load_head(head_path)
    kind = protocol_feature(spec)
    assert meta["feature"] == kind.describe()
    data_spec = parse_data_spec(data)
    val = open_dataset(data_spec, "val", eval_transform(data_spec)[0])
    images = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        logits = head(feature_function(backbone.eval(), spec, kind)(images))
    counts = topk_counts(logits, torch.as_tensor(val.targets))
    return float(100 * counts[0] / counts[2])


def test_linear_protocol_on_an_official_mokd_pair(checkpoint_factory, tiny_cnn_spec, tiny_vit_spec, tmp_path):
    path, models = checkpoint_factory.official_mokd(tiny_cnn_spec, tiny_vit_spec)
    out = tmp_path / "linear.json"
    result = run(["linear", path, "--data", "shapes:100", "--batch-size", 32, "--out", out, *FAST])
    assert "teacher_cnn" in result.output and "teacher_vit" in result.output and "protocol" in result.output
    payload = load_json(out)
    contract(payload, "linear", ["teacher_cnn", "teacher_vit"])
    cnn, vit = payload["results"]
    assert vit["protocol"]["feature"] == "last_cls:4" and cnn["protocol"]["feature"] == "default"
    assert cnn["protocol"]["lr_per_256"] == 0.01 and vit["protocol"]["lr_per_256"] == 0.001  # A.2 at 2,048 / 8
    assert cnn["protocol"]["lr"] == pytest.approx(0.01 * 32 / 256) and vit["protocol"]["lr"] == pytest.approx(
        0.001 * 32 / 256)  # the effective lr at the batch actually used
    assert not cnn["protocol"]["paper"] and {"epochs", "global_batch", "image_size"} <= set(cnn["protocol"]["differs"])
    assert cnn["protocol"]["precision"] == "fp32" and payload["protocol"]["paper"] is False
    assert cnn["protocol"]["backbone_unchanged"] and cnn["protocol"]["batch_size"] == 32
    for entry, spec in ((cnn, tiny_cnn_spec), (vit, tiny_vit_spec)):
        top1 = direct_top1(Path(entry["head"]), models[entry["key"]], spec, "shapes:100")
        assert entry["metrics"]["linear"]["top1"] == pytest.approx(top1)
        log = (Path(entry["head"]).parent / "final" / "log.jsonl").read_text().splitlines()
        assert len(log) == 1 and json.loads(log[0])["epoch"] == 1


def test_linear_cached_reads_the_knn_cache_and_resumes(tmp_path):
    path = timm_init_dino(tmp_path / "dino.pth")
    cache = ["--cache-dir", tmp_path / "cache"]
    run(["knn", path, "--data", "shapes:100", "--num-workers", "0", "--out", tmp_path / "knn.json", *cache])
    out = tmp_path / "cached.json"
    args = ["linear", path, "--mode", "cached", "--data", "shapes:100", "--batch-size", 16, "--lr", "0.1,1,10",
            "--out", out, *cache, "--num-workers", "0", "--device", "cpu"]
    result = run([*args, "--epochs", 2])
    assert "head sweep scored by 5-fold cross-validation on the training set" in result.output  # 80 images
    payload = load_json(out)
    contract(payload, "linear", ["teacher"])
    entry = payload["results"][0]
    assert entry["protocol"]["features_from_cache"]  # the very features knn extracted
    assert "extract" not in payload["timings"]
    assert len(entry["protocol"]["heads"]) == 3 and entry["protocol"]["lr_chosen"] in (0.1, 1.0, 10.0)
    folds = load_json(Path(entry["protocol"]["heldout"]["indices_file"]))["folds"]
    assert sorted(sum(folds, [])) == list(range(entry["protocol"]["heldout"]["images"])) and len(folds) == 5
    head, meta = load_head(entry["head"])
    assert head.weight.shape == (10, CNN.feature_dim) and meta["source"]["mode"] == "cached"
    # a longer run resumed from the 2-epoch checkpoint is refused (other settings), the same one is reused
    assert "other sweep settings" in one_line_error(run([*args, "--epochs", 3, "--resume"], expect=2))
    again = load_json(out) if run([*args, "--epochs", 2, "--resume"]) else None
    assert again["results"][0]["protocol"]["resumed_from_epoch"] == 2
    assert again["results"][0]["metrics"] == payload["results"][0]["metrics"]


def test_cached_choice_ignores_validation_labels(tmp_path, monkeypatch):
    from mokd_eval import linear_eval
    from mokd.core.distributed import setup
    from mokd.core.features import FeatureCache
    from mokd.core import pipeline
    from mokd.core.pipeline import FeatureOptions, RunSettings, open_eval_data
    from mokd_eval.protocols import TrainOptions

    path = timm_init_dino(tmp_path / "dino.pth")
    options = TrainOptions(epochs=3, lrs=(0.01, 0.1, 1.0, 10.0), batch_size=32, num_workers=0)
    features = FeatureOptions(cache=FeatureCache(None), num_workers=0, device="cpu")

    def evaluate(out: Path) -> dict:
        return linear_eval.run_linear(path, RunSettings(data="shapes:100", echo=lambda _: None), mode="cached",
                                      features=features, feature_given=False, options=options, out=out,
                                      context=setup("cpu"))

    clean = evaluate(tmp_path / "clean.json")

    def poisoned(*args, **kwargs):
        data = open_eval_data(*args, **kwargs)
        data.val.targets = np.roll(data.val.targets, 7)[::-1].copy()  # every val label scrambled
        return data

    monkeypatch.setattr(pipeline, "open_eval_data", poisoned)  # what `open_data_for` opens the data with
    dirty = evaluate(tmp_path / "dirty.json")
    assert dirty["results"][0]["protocol"]["heads"] == clean["results"][0]["protocol"]["heads"]
    assert dirty["results"][0]["protocol"]["lr_chosen"] == clean["results"][0]["protocol"]["lr_chosen"]
    assert dirty["results"][0]["metrics"] != clean["results"][0]["metrics"]  # the poison did reach val


def test_protocol_mode_fails_loudly_when_the_backbone_changes(tmp_path, monkeypatch):
    from mokd_eval.finetune import Classifier

    path = timm_init_dino(tmp_path / "dino.pth")
    monkeypatch.setattr(Classifier, "train", lambda self, mode=True: torch.nn.Module.train(self, mode))  # BN drifts
    result = run(["linear", path, "--data", "shapes:60", "--out", tmp_path / "x.json", *FAST], expect=2)
    assert "frozen backbone changed during the linear probe" in one_line_error(result)
    assert not (tmp_path / "x.json").exists()


def test_semisup_finetune_writes_a_reusable_split(tmp_path):
    path = timm_init_dino(tmp_path / "dino.pth")
    out = tmp_path / "semi.json"
    result = run(["semisup", path, "--percent", 1, "--data", "digits", "--out", out, *FAST])
    assert "full fine-tuning" in result.output
    payload = load_json(out)
    contract(payload, "semisup", ["teacher"])
    split = payload["results"][0]["protocol"]["split"]
    assert split["source"] == "stratified" and split["images"] == 14  # floor(1437 / 100)
    names = Path(split["file"]).read_text().splitlines()
    assert len(names) == 14 and all(name.startswith("train_") for name in names)
    again = tmp_path / "again.json"
    run(["semisup", path, "--percent", 1, "--data", "digits", "--split-file", split["file"], "--out", again, *FAST])
    reused = load_json(again)["results"][0]
    assert reused["protocol"]["split"]["source"] == "file" and reused["protocol"]["split"]["sha256"] == split["sha256"]
    assert reused["metrics"] == payload["results"][0]["metrics"]  # same subset, seed and settings


def test_semisup_linear_on_a_pair_with_an_lr_search(checkpoint_factory, tiny_cnn_spec, tiny_vit_spec, tmp_path):
    path, _ = checkpoint_factory.official_mokd(tiny_cnn_spec, tiny_vit_spec)
    out = tmp_path / "semi.json"
    result = run(["semisup", path, "--percent", 10, "--mode", "linear", "--data", "shapes:200", "--lr", "0.01,0.1",
                  "--out", out, *FAST])
    assert "frozen linear probe" in result.output
    payload = load_json(out)
    contract(payload, "semisup", ["teacher_cnn", "teacher_vit"])
    for entry in payload["results"]:
        assert entry["protocol"]["mode"] == "linear" and "not the paper" in entry["protocol"]["label"]
        assert [row["lr"] for row in entry["protocol"]["lr_search"]] == [0.01, 0.1]
        assert (Path(entry["run_dir"]) / "heldout.json").exists()


def fake_cifar10(root: Path, per_batch: int = 6) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, per_batch).tolist()}, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, handle)
    return folder


def test_cifar_on_a_pair_and_a_dino_checkpoint(checkpoint_factory, tiny_cnn_spec, tiny_vit_spec, tmp_path,
                                                monkeypatch):
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    folder = fake_cifar10(tmp_path / "data")
    pair, _ = checkpoint_factory.official_mokd(tiny_cnn_spec, tiny_vit_spec)
    out = tmp_path / "cifar.json"
    run(["cifar", pair, "--dataset", "cifar10", "--data", folder, "--batch-size", 8, "--out", out, *FAST])
    payload = load_json(out)
    contract(payload, "cifar", ["teacher_cnn", "teacher_vit"])
    assert payload["dataset"]["train_images"] == 30 and payload["dataset"]["num_classes"] == 10
    assert [entry["protocol"]["image_size"] for entry in payload["results"]] == [32, 32]  # pre-training size
    assert payload["results"][0]["protocol"]["warmup_epochs"] == 0  # 10 of 100, scaled to 1 epoch
    dino = timm_init_dino(tmp_path / "dino.pth")
    result = run(["cifar", dino, "--dataset", "cifar10", "--data", folder.parent, "--image-size", 16,
                  "--out", tmp_path / "d.json", *FAST])
    assert "warning: training: batch 1024 is larger than the 30 training images" in result.output
    entry = load_json(tmp_path / "d.json")["results"][0]
    assert entry["protocol"]["image_size"] == 16 and entry["protocol"]["batch_size"] == 30


def tiny_imagefolder(root: Path, classes: int) -> Path:
    for split, count in (("train", 3), ("val", 1)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((32, 32, 3), 40 * c + i, np.uint8)).save(folder / f"{split}{c}_{i}.png")
    return root


def test_cifar_from_png_folders_takes_the_pickles_recipe(tmp_path):
    """imagefolder:PATH (e.g. cifar2png's output): class count from the folder, A.4's RandomResizedCrop + flip,
    the 32 px images resized to the training size as the pickles are (no resize-256 / centre crop)."""
    dino = timm_init_dino(tmp_path / "dino.pth")
    folder = tiny_imagefolder(tmp_path / "pngs", classes=4)
    run(["cifar", dino, "--dataset", "cifar10", "--data", f"imagefolder:{folder}", "--image-size", 16,
         "--out", tmp_path / "png.json", *FAST])
    payload = load_json(tmp_path / "png.json")
    entry = payload["results"][0]
    assert payload["dataset"]["num_classes"] == 4 and payload["dataset"]["train_images"] == 12
    assert entry["protocol"]["augmentation"] == "random-resized-crop+flip"
    assert entry["protocol"]["train_transform"].startswith("RandomResizedCrop(16,")
    assert entry["protocol"]["eval_transform"].startswith("Resize(16x16, bicubic)")
    padded = run(["cifar", dino, "--dataset", "cifar10", "--data", f"imagefolder:{folder}", "--image-size", 16,
                  "--augment", "padded", "--out", tmp_path / "padded.json", *FAST])
    assert padded.exit_code == 0
    record = load_json(tmp_path / "padded.json")["results"][0]["protocol"]
    assert record["augmentation"] == "padded-crop+flip" and "augmentation" in record["differs"]


def test_the_resolution_defaults_to_the_training_crop_and_is_printed(checkpoint_factory, tmp_path):
    path, _ = checkpoint_factory.mokd_native(CNN, name="crop16.pth")
    state = torch.load(path, weights_only=True)
    state["config"]["img_size"] = 16
    torch.save(state, path)
    result = run(["knn", path, "--data", "digits", "--num-workers", "0", "--out", tmp_path / "knn.json",
                  "--no-cache"])
    assert "resolution: 16 px (the checkpoint's training crop size)" in result.output
    record = load_json(tmp_path / "knn.json")["results"][0]["protocol"]
    assert record["image_size"] == 16 and "image_size" not in record["differs"] and record["paper"] is True
    assert load_json(tmp_path / "knn.json")["dataset"]["transform"].startswith("Resize(16x16, bicubic)")


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    path = timm_init_dino(tmp_path / "dino.pth")
    out = tmp_path / "never.json"
    cases = [
        (["linear", path, "--data", f"imagefolder:{tmp_path / 'nowhere'}"], "does not exist"),
        (["semisup", path, "--percent", 5, "--data", "digits"], "--percent must be 1 or 10"),
        (["cifar", path, "--dataset", "cifar100", "--data", tmp_path], "no cifar-100-python folder"),
        (["linear", path, "--data", "digits", "--lr", "fast"], "--lr takes numbers"),
    ]
    bad_split = tmp_path / "split.txt"
    bad_split.write_text("train_000000\nnot_an_image.png\n")
    cases.append((["semisup", path, "--percent", 1, "--data", "digits", "--split-file", bad_split],
                  "1 of 2 names are not in the training set (not_an_image.png)"))
    short_split = tmp_path / "short.txt"
    short_split.write_text("train_000000\ntrain_000001\n")
    cases.append((["semisup", path, "--percent", 1, "--data", "digits", "--split-file", short_split],
                  "lists 2 images, but 1% of the 1437 training images is 14"))
    for args, message in cases:
        result = run([*args, "--out", out, *FAST], expect=2)
        assert message in one_line_error(result), (args, result.output)
        assert not out.exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run(["semisup", path, "--percent", 1, "--out", blocker / "r.json", *FAST], expect=2)
    assert "cannot be created because" in one_line_error(result)


def test_resuming_with_another_class_count_is_refused(tmp_path):
    path = timm_init_dino(tmp_path / "dino.pth")
    out = tmp_path / "linear.json"
    run(["linear", path, "--data", "shapes:60", "--out", out, *FAST])
    tree = tiny_imagefolder(tmp_path / "tree", classes=3)
    result = run(["linear", path, "--data", f"imagefolder:{tree}", "--image-size", 32, "--resume", "--out", out,
                  *FAST], expect=2)
    assert "trained for 10 classes but the dataset has 3" in one_line_error(result)


def test_protocol_mode_lowers_the_training_loss(tmp_path):
    path = timm_init_dino(tmp_path / "dino.pth")
    out = tmp_path / "linear.json"
    run(["linear", path, "--data", "shapes:200", "--batch-size", 32, "--lr", 8.0, "--out", out,
         "--num-workers", "0", "--device", "cpu", "--epochs", 3])
    history = load_json(out)["results"][0]["protocol"]["history"]
    assert [record["epoch"] for record in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"] - 0.05, history
