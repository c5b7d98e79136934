"""A checkpoint written by `mokd-train` (native and `--export-official`) evaluates in `mokd-eval knn`."""

import json

from click.testing import CliRunner

from mokd.cli import mokd_eval, mokd_train
import pytest

pytestmark = pytest.mark.slow  # trains, then evaluates

TRAIN_ARGS = ["--preset", "tiny", "--arch1", "r18", "--arch2", "vit_t", "--data", "shapes:50", "--img-size", "32",
              "--local-size", "16", "--n-local", "2", "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0",
              "--out-dim", "64", "--mlp-hidden-dim", "32", "--mlp-bottleneck-dim", "16", "--num-workers", "0",
              "--max-steps", "2", "--export-official", "--no-thead-l2norm",
              "--thead-depth", "3"]  # the official T-Head: 3 blocks, unnormalised


def test_native_and_official_checkpoints_evaluate_both_models_identically(tmp_path):
    runner = CliRunner()
    trained = runner.invoke(mokd_train, [*TRAIN_ARGS, "--output-dir", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    official = next((tmp_path / "run" / "official").glob("*_temp.pth"))
    payloads = {}
    for name, path in (("native", tmp_path / "run" / "checkpoint.pth"), ("official", official)):
        out = tmp_path / f"{name}.json"
        result = runner.invoke(mokd_eval, ["knn", str(path), "--data", "shapes:50", 
                                           "--k", "5,10", "--no-cache", "--num-workers", "0", "--out", str(out)])
        assert result.exit_code == 0, result.output
        payloads[name] = json.loads(out.read_text())
    native, exported = payloads["native"]["results"], payloads["official"]["results"]
    assert [entry["key"] for entry in native] == ["teacher1", "teacher2"]
    assert [entry["key"] for entry in exported] == ["teacher_cnn", "teacher_vit"]
    assert [entry["arch"] for entry in native] == ["r18", "vit_t"]
    for ours, theirs in zip(native, exported):
        assert ours["metrics"] == theirs["metrics"]  # same teacher weights, two layouts


def test_training_user_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(mokd_train, ["--preset", "nope", "--output-dir", str(tmp_path)])
    assert result.exit_code == 2 and result.output.startswith("error: unknown preset 'nope'")
    result = CliRunner().invoke(mokd_train, ["--preset", "tiny", "--losses", "sm,xx", "--output-dir", str(tmp_path)])
    assert result.exit_code == 2 and "losses" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(mokd_train, ["--preset", "tiny", "--arch1", "r18", "--img-size", "16",
                                             "--output-dir", str(tmp_path)])
    assert result.exit_code == 2 and "output stride 32" in result.output


def test_every_training_setting_is_a_documented_flag():
    import dataclasses

    from mokd_train.config import FIELD_HELP, TrainConfig

    help_text = CliRunner().invoke(mokd_train, ["--help"]).output
    for field in dataclasses.fields(TrainConfig):
        if field.name != "preset":
            assert "--" + field.name.replace("_", "-") in help_text
    assert set(FIELD_HELP) <= {field.name for field in dataclasses.fields(TrainConfig)}


def test_a_run_with_official_224px_grids_evaluates_at_any_image_size(tmp_path):
    """--position-size 224 keeps the official grids (ViT 14x14) while training on 32 px crops; mokd-eval builds
    the ViT with that grid from either layout and resizes it for every --image-size."""
    runner = CliRunner()
    trained = runner.invoke(mokd_train, [*TRAIN_ARGS, "--max-steps", "1", "--position-size", "224",
                                         "--output-dir", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["position_size"] == 224
    official = next((tmp_path / "run" / "official").glob("*_temp.pth"))
    metrics = {}
    for layout, path in (("native", tmp_path / "run" / "checkpoint.pth"), ("official", official)):
        for size in ("32", "64"):
            out = tmp_path / f"{layout}_{size}.json"
            result = runner.invoke(mokd_eval, ["knn", str(path), "--data", "shapes:50", "--image-size", size,
                                               "--k", "5", "--no-cache", "--num-workers", "0", "--out", str(out)])
            assert result.exit_code == 0, result.output
            assert f"position embedding kept at 224px, resampled on the fly for {size}px inputs" in result.output
            metrics[layout, size] = [entry["metrics"] for entry in json.loads(out.read_text())["results"]]
    for size in ("32", "64"):
        assert len(metrics["native", size]) == 2
        assert metrics["native", size] == metrics["official", size]  # same teachers, two layouts
