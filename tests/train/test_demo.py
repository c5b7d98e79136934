"""`mokd-eval demo`: trains both modes, evaluates the four models and prints the comparison (shrunk for tests)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mokd.cli import mokd_eval
from mokd_train import demo
from mokd_eval.knn import knn_classify
from mokd.core.pipeline import open_eval_data

pytestmark = pytest.mark.slow  # trains


@pytest.fixture
def small_demo(shrink_demo):
    shrink_demo(demo)


def test_demo_trains_both_modes_and_reports_four_models(small_demo, tmp_path):
    result = CliRunner().invoke(mokd_eval, ["demo", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Independent" in result.output and "raw pixels (reference)" in result.output
    assert "random init" in result.output and "MOKD - init" in result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(entry["mode"], entry["key"]) for entry in summary["results"]] == [
        ("random_init", "teacher1"), ("random_init", "teacher2"), ("independent", "teacher1"),
        ("independent", "teacher2"), ("mokd", "teacher1"), ("mokd", "teacher2")]
    for mode in (demo.RANDOM_INIT, *demo.MODES):
        assert (tmp_path / mode / "checkpoint.pth").exists() and (tmp_path / mode / "knn.json").exists()
    for mode in demo.MODES:
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


def test_several_seeds_print_mean_and_sample_std(small_demo, tmp_path):
    result = CliRunner().invoke(mokd_eval, ["demo", "--output-dir", str(tmp_path), "--seeds", "2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["seeds"] == [3, 4]
    assert (tmp_path / "seed4" / "mokd" / "knn.json").exists()
    top1 = summary["config"]["best_k_top1"]
    net1 = next(name for name in top1 if name.startswith("Net1"))
    mokd, init = top1[net1]["mokd"], top1[net1]["random_init"]
    deltas = [m - i for m, i in zip(mokd, init)]
    expected = f"{np.mean(deltas):.2f} +/- {np.std(deltas, ddof=1):.2f}"
    row = next(line for line in result.output.splitlines() if line.startswith(net1))
    assert row.rstrip().endswith(expected)
    assert f"{np.mean(init):.2f} +/- {abs(init[0] - init[1]) / np.sqrt(2):.2f}" in row


def test_random_init_is_the_trained_runs_starting_point(tmp_path):
    """A run that cannot move (lr 0, EMA momentum 1) keeps exactly the parameters save_initial_checkpoint wrote."""
    from mokd_train.config import resolve_config
    from mokd_train.engine import save_initial_checkpoint, train

    settings = dict(data="shapes:60", img_size=16, local_size=8, batch_size=8, max_steps=1, out_dim=64,
                    mlp_hidden_dim=32, mlp_bottleneck_dim=16, num_workers=0, warmup_epochs=0, lr_cnn=0.0,
                    min_lr_cnn=0.0, lr_vit=0.0, min_lr_vit=0.0, momentum_teacher=1.0,
                    momentum_teacher_end=1.0)
    initial = save_initial_checkpoint(resolve_config("tiny", None, {**settings, "output_dir": str(tmp_path / "a")}))
    trained = train(resolve_config("tiny", None, {**settings, "output_dir": str(tmp_path / "b")}))["checkpoint"]
    before, after = (torch.load(path, weights_only=True) for path in (initial, trained))
    assert before["global_step"] == 0 and after["global_step"] == 1
    for network in ("teacher1", "teacher2"):
        params = [key for key in before[network] if "running_" not in key and "num_batches" not in key]
        assert params
        for key in params:
            torch.testing.assert_close(after[network][key], before[network][key], rtol=0, atol=0, msg=key)
