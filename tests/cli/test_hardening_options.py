"""Issue 18, class 6: a setting the chosen method or mode never reads is refused (one line naming the method,
exit 2, nothing written) instead of being ignored; the same setting is accepted where it is read."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mokd.cli import mokd_train
from mokd.core.errors import MokdError
from mokd_train.config import resolve_config


@pytest.mark.parametrize("args,message", [
    (["--method", "dogo", "--queue-size", "512"], "--queue-size does not apply to --method dogo"),
    (["--method", "dogo", "--lr-milestones", "0.5"], "--lr-milestones does not apply to --method dogo"),
    (["--method", "dino+mcl", "--lr-milestones", "0.5"], "--lr-milestones does not apply to --method dino+mcl"),
    (["--peer-lr", "0.1"], "--peer-lr does not apply to --method mokd"),
    (["--method", "mcl", "--lr-cnn", "0.1", "--weight-decay-vit", "0.1"],
     "--lr-cnn, --weight-decay-vit do not apply to --method mcl"),
    (["--method", "dino+dogo", "--thead-depth", "2"], "--thead-depth does not apply to --method dino+dogo"),
    (["--method", "mcl", "--losses", "sm,cm"], "--losses does not apply to --method mcl"),
    (["--mode", "independent", "--lambda2", "0.5"], "--lambda2 does not apply to --mode independent"),
    (["--mode", "independent", "--lambda1", "1", "--lambda2", "1"], "--lambda1, --lambda2 do not apply"),
])
def test_unused_settings_are_refused_naming_the_method(tmp_path, args, message):
    run = tmp_path / "run"
    result = CliRunner().invoke(mokd_train, ["--preset", "tiny", "--output-dir", str(run), *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output, result.output
    assert not run.exists()


def test_yaml_settings_are_held_to_the_same_rule(tmp_path):
    config = tmp_path / "dogo.yaml"
    config.write_text("method: dogo\nqueue_size: 2048\n")
    with pytest.raises(MokdError, match=f"--queue-size does not apply to --method dogo"):
        resolve_config("tiny", config, {"output_dir": str(tmp_path / "run")})


@pytest.mark.parametrize("method,setting,value", [("mcl", "queue_size", 2048), ("mcl", "lr_milestones", "0.5"),
                                                  ("dogo", "peer_lr", 0.01), ("dino+mcl", "queue_size", 2048),
                                                  ("mokd", "thead_depth", 2), ("dino+dogo", "lr_vit", 0.01)])
def test_settings_are_accepted_by_the_methods_that_read_them(tmp_path, method, setting, value):
    config = resolve_config("tiny", None, {"output_dir": str(tmp_path / "run"), "method": method, setting: value})
    assert getattr(config, setting) == (tuple(float(v) for v in value.split(",")) if isinstance(value, str)
                                        else value)


def test_preset_and_method_defaults_are_never_counted_as_given(tmp_path):
    # tiny sets lr_cnn, thead_depth, cnn_optimizer; mcl's own layer sets momentum_teacher and queue_size
    config = resolve_config("tiny", None, {"output_dir": str(tmp_path / "run"), "method": "mcl"})
    assert config.method == "mcl" and config.queue_size == 1024


SUITE_ONLY_KNN_AND_TSNE = "linear,semisup1,semisup10,cifar10,cifar100,coco,consistency,mad,report"


@pytest.mark.slow  # runs the suite's k-NN and t-SNE steps twice
def test_suite_passes_skip_bad_images_to_its_steps_and_records_it(tmp_path, checkpoint_factory, tiny_cnn_spec):
    import json

    from mokd.cli import mokd_eval
    from tests.cli.test_hardening_tracebacks import assert_one_line_error, image_folder

    path, _ = checkpoint_factory.dino(tiny_cnn_spec, name="model.pth")
    data = image_folder(tmp_path / "data")
    broken = data / "val" / "b" / "broken.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "suite"
    args = ["suite", str(path), "--data", f"imagefolder:{data}", "--out-dir", str(out), "--skip",
            SUITE_ONLY_KNN_AND_TSNE, "--no-cache", "--num-workers", "0"]

    strict = CliRunner().invoke(mokd_eval, args)
    assert_one_line_error(strict, "suite: step(s) knn, tsne failed", str(broken), "--skip-bad-images")
    assert not (out / "knn" / "model.json").exists() and not (out / "tsne" / "model.json").exists()

    lenient = CliRunner().invoke(mokd_eval, [*args, "--skip-bad-images"])
    assert lenient.exit_code == 0, lenient.output
    statuses = {step["step"]: step for step in json.loads((out / "suite" / "model.json").read_text())["steps"]}
    assert statuses["knn"]["status"] == statuses["tsne"]["status"] == "done"
    assert statuses["knn"]["skipped_images"] == 1 and "1 unreadable images skipped" in lenient.output
    for step in ("knn", "tsne"):
        settings = json.loads((out / step / "model.json").read_text())["suite"]["settings"]
        assert settings["skip_bad_images"] is True
    # the suite has no --classes: on 2 classes its t-SNE draws both instead of failing on the paper's 10
    assert json.loads((out / "tsne" / "model.json").read_text())["tsne"]["classes"] == [0, 1]
