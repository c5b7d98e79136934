"""`mokd-eval` end to end through click's test runner, on digits and shapes."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mokd.cli import mokd_eval
from mokd.core.data import eval_transform, open_dataset, parse_data_spec
from mokd_eval.knn import knn_classify

pytestmark = pytest.mark.slow  # runs every command end to end

FAST = ["--num-workers", "0", "--batch-size", "128"]


def run(args, expect=0):
    result = CliRunner().invoke(mokd_eval, args)
    assert result.exit_code == expect, result.output
    return result


def direct_features(model, spec_text, split):
    spec = parse_data_spec(spec_text)
    transform, _ = eval_transform(spec)
    dataset = open_dataset(spec, split, transform)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        return model(images).numpy(), dataset.targets


def test_knn_on_a_pair_checkpoint_reports_both_models_and_matches_a_direct_forward(
        checkpoint_factory, tiny_cnn_spec, tiny_vit_spec, tmp_path):
    path, models = checkpoint_factory.official_mokd(tiny_cnn_spec, tiny_vit_spec)
    out = tmp_path / "knn.json"
    result = run(["knn", str(path), "--data", "shapes:100", "--k", "1,3,20", "--out", str(out),
                  "--cache-dir", str(tmp_path / "cache"), *FAST])
    assert "teacher_cnn top1" in result.output and "teacher_vit top1" in result.output
    payload = json.loads(out.read_text())
    assert [entry["key"] for entry in payload["results"]] == ["teacher_cnn", "teacher_vit"]
    assert payload["dataset"]["spec"] == "shapes:100" and payload["protocol"]["temperature"] == 0.07
    assert len(payload["results"][0]["checkpoint"]["sha256"]) == 64
    for entry in payload["results"]:
        train_x, train_y = direct_features(models[entry["key"]], "shapes:100", "train")
        val_x, val_y = direct_features(models[entry["key"]], "shapes:100", "val")
        expected = knn_classify(train_x, train_y, val_x, val_y, num_classes=10, ks=(1, 3, 20))
        for k in (1, 3, 20):
            assert entry["metrics"]["knn"][str(k)]["top1"] == pytest.approx(expected.metrics[k]["top1"])
            assert entry["metrics"]["knn"][str(k)]["top5"] == pytest.approx(expected.metrics[k]["top5"])


def test_second_run_uses_the_cache(checkpoint_factory, tiny_cnn_spec, tmp_path):
    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    args = ["knn", str(path), "--data", "shapes:60", "--cache-dir", str(tmp_path / "cache"), *FAST]
    first = json.loads(run([*args, "--out", str(tmp_path / "a.json")]) and (tmp_path / "a.json").read_text())
    second = json.loads(run([*args, "--out", str(tmp_path / "b.json")]) and (tmp_path / "b.json").read_text())
    assert not first["results"][0]["features_from_cache"] and second["results"][0]["features_from_cache"]
    assert "extract" not in second["timings"]
    assert first["results"][0]["metrics"] == second["results"][0]["metrics"]


def test_knn_on_digits_with_key_selection(checkpoint_factory, tiny_cnn_spec, tmp_path):
    path, _ = checkpoint_factory.moco(tiny_cnn_spec)
    out = tmp_path / "moco.json"
    result = run(["knn", str(path), "--data", "digits", "--key", "encoder_k", "--no-cache", "--out", str(out), *FAST])
    assert "encoder_k" in result.output
    payload = json.loads(out.read_text())
    assert payload["dataset"]["train_images"] + payload["dataset"]["val_images"] == 1797
    metrics = payload["results"][0]["metrics"]["knn"]
    assert set(metrics) == {"10", "20", "100", "200"}
    assert all(0.0 <= m["top1"] <= m["top5"] <= 100.0 for m in metrics.values())


@pytest.mark.parametrize("args, message", [
    (["knn", "/no/such/file.pth"], "does not exist"),
    (["knn", "{ckpt}", "--k", "ten"], "--k takes comma-separated"),
    (["knn", "{ckpt}", "--data", "mnist"], "digits"),
    (["knn", "{ckpt}", "--data", "cifar10:/no/where"], "cifar"),
    (["knn", "{ckpt}", "--key", "teacher_cnn"], "teacher"),
    (["knn", "{ckpt}", "--model", "r18"], "r18"),
    (["knn", "{ckpt}", "--feature", "bogus"], "unknown feature type"),
])
def test_user_errors_are_one_line_without_traceback(checkpoint_factory, tiny_cnn_spec, args, message):
    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    result = CliRunner().invoke(mokd_eval, [a.format(ckpt=path) for a in args] + ["--no-cache", *FAST])
    assert result.exit_code == 2, result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert "Traceback" not in result.output


def test_inspect_lists_models_and_writes_json(checkpoint_factory, tiny_cnn_spec, tiny_vit_spec, tmp_path):
    path, models = checkpoint_factory.official_mokd(tiny_cnn_spec, tiny_vit_spec)
    out = tmp_path / "inspect.json"
    result = run(["inspect", str(path), "--out", str(out)])
    assert "mokd-official" in result.output and "teacher_vit" in result.output
    payload = json.loads(out.read_text())
    params = {entry["key"]: entry["backbone_params"] for entry in payload["results"]}
    assert params["teacher_cnn"] == sum(p.numel() for p in models["teacher_cnn"].parameters())


def test_code_carrying_pickle_is_refused_without_the_trust_flag(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": np.random.default_rng}, path)
    result = CliRunner().invoke(mokd_eval, ["inspect", str(path)])
    assert result.exit_code == 2 and "--trust-checkpoint" in result.output


def test_skipped_images_are_counted_on_screen_and_a_strict_rerun_fails_cleanly(tmp_path, checkpoint_factory,
                                                                               tiny_cnn_spec):
    from tests.core.test_features import _folder_with_a_corrupt_image

    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    bad = _folder_with_a_corrupt_image(tmp_path / "images")
    args = ["knn", str(path), "--data", f"imagefolder:{tmp_path / 'images'}", "--image-size", "32", "--k", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r.json"), *FAST]
    lenient = run([*args, "--skip-bad-images"])
    assert "train: skipped 1 unreadable images" in lenient.output
    strict = run(args, expect=2)
    assert strict.output.strip().splitlines()[-1] == (f"error: cannot read image {bad} (not an image file PIL can "
                                                      f"decode); fix or remove it, or pass --skip-bad-images")
