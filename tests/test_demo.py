"""`mokd-eval demo`: trains both modes, evaluates the four models and prints the comparison (shrunk for tests)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import mokd_eval
from mokd_eval import demo
from mokd_eval.knn import knn_classify
from mokd_eval.pipeline import open_eval_data


@pytest.fixture
def small_demo(monkeypatch):
    monkeypatch.setattr(demo, "DEMO_DATA", "shapes:60")
    monkeypatch.setattr(demo, "DEMO_SETTINGS", {
        "img_size": 16, "local_size": 8, "epochs": 1, "batch_size": 8, "max_steps": 2, "out_dim": 64,
        "mlp_hidden_dim": 32, "mlp_bottleneck_dim": 16, "num_workers": 0, "warmup_epochs": 0})


def test_demo_trains_both_modes_and_reports_four_models(small_demo, tmp_path):
    result = CliRunner().invoke(mokd_eval, ["demo", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Independent" in result.output and "raw pixels (reference)" in result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(entry["mode"], entry["key"]) for entry in summary["results"]] == [
        ("independent", "teacher1"), ("independent", "teacher2"), ("mokd", "teacher1"), ("mokd", "teacher2")]
    for mode in demo.MODES:
        assert (tmp_path / mode / "checkpoint.pth").exists() and (tmp_path / mode / "knn.json").exists()
        config = json.loads((tmp_path / mode / "config.json").read_text())
        assert config["mode"] == mode and config["seed"] == 0


def test_raw_pixel_baseline_equals_a_direct_computation():
    data = open_eval_data("shapes:60", image_size=16)
    baseline = demo.raw_pixel_knn(data, (1, 5), 0.07)
    train_x = torch.stack([data.train[i][0] for i in range(len(data.train))]).flatten(1).numpy()
    val_x = torch.stack([data.val[i][0] for i in range(len(data.val))]).flatten(1).numpy()
    expected = knn_classify(train_x, data.train.targets, val_x, data.val.targets, num_classes=10, ks=(1, 5))
    assert baseline["metrics"]["1"]["top1"] == pytest.approx(expected.metrics[1]["top1"])
    # k = 1 is the nearest neighbour's label: check that too without FAISS
    sims = (val_x / np.linalg.norm(val_x, axis=1, keepdims=True)) @ (
        train_x / np.linalg.norm(train_x, axis=1, keepdims=True)).T
    nearest = data.train.targets[sims.argmax(1)]
    assert baseline["metrics"]["1"]["top1"] == pytest.approx(100 * np.mean(nearest == data.val.targets))
