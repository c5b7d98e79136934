"""`suite`: the table of steps, honest skips, resumption, and the whole run end to end on digits."""

import json

import pytest
from click.testing import CliRunner

from mokd_analysis.suite import STEP_NAMES, STEPS, Step, call_arguments, parse_skip, resolve, run_step
from mokd.cli import mokd_eval
from mokd.core.errors import MokdError
from mokd.core.registry import ALIASES


def test_every_paper_step_is_in_the_table_in_order():
    assert STEP_NAMES == ("knn", "linear", "semisup1", "semisup10", "cifar10", "cifar100", "coco", "consistency",
                          "tsne", "mad", "report")
    assert all(":" in step.target for step in STEPS)


def test_unknown_skip_names_are_refused():
    assert parse_skip("linear, coco") == {"linear", "coco"}
    with pytest.raises(MokdError, match="unknown step"):
        parse_skip("linear,knnn")


def test_a_missing_module_or_function_is_a_skip_reason_not_an_error():
    function, reason = resolve(Step("x", "mokd_eval.no_such_module:run"))
    assert function is None and "not available in this build" in reason
    function, reason = resolve(Step("x", "mokd_eval.knn_eval:no_such_function"))
    assert function is None and "no_such_function does not exist" in reason


def test_arguments_are_matched_to_the_signature_and_unprovidable_ones_named():
    def logic(checkpoint_path, *, data, options, seed=0):
        return {}

    chosen, missing = call_arguments(logic, {"checkpoint": "c.pth", "data": "digits", "seed": 3, "echo": print})
    assert chosen == {"checkpoint_path": "c.pth", "data": "digits", "seed": 3}
    assert missing == ["options"]


def test_a_step_whose_logic_needs_more_than_the_suite_offers_is_skipped_with_the_reason(tmp_path):
    from mokd_analysis.suite import SuiteContext
    from mokd.core.features import FeatureCache
    from mokd.core.pipeline import FeatureOptions

    context = SuiteContext(checkpoint=tmp_path / "c.pth", out_dir=tmp_path, data="digits",
                           features=FeatureOptions(cache=FeatureCache(None)), model=None, key=None, trust=False,
                           image_size=None, seed=0, echo=lambda message: None)
    status = run_step(Step("split", "mokd_analysis.consistency:consistency_stats"), context)
    assert status["status"] == "skipped" and "needs" in status["reason"] and "num_classes" in status["reason"]


def test_suite_runs_every_available_step_then_reuses_them(checkpoint_factory, tmp_path):
    import dataclasses

    vit = dataclasses.replace(ALIASES["vit_t"], name="vit_small_test", embed_dim=48, depth=2, num_heads=3,
                              patch_size=8, img_size=32)
    path, _ = checkpoint_factory.mokd_native(ALIASES["r_tiny"], vit, name="pair.pth")
    args = ["suite", str(path), "--data", "shapes:100", "--out-dir", str(tmp_path / "suite"), "--skip", "tsne",
            "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0", "--epochs", "1", "--batch-size", "32"]
    first = CliRunner().invoke(mokd_eval, args)
    assert first.exit_code == 0, first.output
    payload = json.loads((tmp_path / "suite" / "suite" / "pair.json").read_text())
    status = {step["step"]: step for step in payload["steps"]}
    assert {name: status[name]["status"] for name in STEP_NAMES} == {
        "knn": "done", "linear": "done", "semisup1": "done", "semisup10": "done", "cifar10": "skipped",
        "cifar100": "skipped", "coco": "skipped", "consistency": "done", "tsne": "skipped", "mad": "done",
        "report": "done"}
    assert status["tsne"]["reason"] == "--skip"
    assert "needs --coco-data" in status["coco"]["reason"] and "needs --cifar-data" in status["cifar10"]["reason"]
    semisup = json.loads((tmp_path / "suite" / "semisup1" / "pair.json").read_text())
    assert semisup["results"][0]["metrics"]["semisup"]["top1"] >= 0 and semisup["protocol"]["percent"] == 1
    knn = json.loads((tmp_path / "suite" / "knn" / "pair.json").read_text())
    assert knn["command"] == "knn" and knn["suite"]["settings"]["checkpoint_sha256"] == knn["results"][0][
        "checkpoint"]["sha256"]
    assert "Table 9" in (tmp_path / "suite" / "report" / "report.md").read_text()

    second = CliRunner().invoke(mokd_eval, args)
    assert second.exit_code == 0, second.output
    again = {step["step"]: step["status"]
             for step in json.loads((tmp_path / "suite" / "suite" / "pair.json").read_text())["steps"]}
    assert again["knn"] == again["linear"] == again["consistency"] == again["mad"] == "reused"

    changed = CliRunner().invoke(mokd_eval, [*args, "--seed", "1"])  # other settings: nothing is reused
    assert changed.exit_code == 0, changed.output
    third = {step["step"]: step["status"]
             for step in json.loads((tmp_path / "suite" / "suite" / "pair.json").read_text())["steps"]}
    assert third["knn"] == "done"


def test_consistency_is_skipped_for_a_single_model_checkpoint(checkpoint_factory, tiny_cnn_spec, tmp_path):
    from mokd_analysis.suite import SuiteContext
    from mokd.core.features import FeatureCache
    from mokd.core.pipeline import FeatureOptions

    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    context = SuiteContext(checkpoint=path, out_dir=tmp_path, data="shapes:50",
                           features=FeatureOptions(cache=FeatureCache(None)), model=None, key=None, trust=False,
                           image_size=None, seed=0, echo=lambda message: None)
    status = run_step(next(step for step in STEPS if step.name == "consistency"), context)
    assert status["status"] == "skipped" and "needs a pair checkpoint" in status["reason"]


def test_coco_is_skipped_without_data_or_without_a_standard_resnet(checkpoint_factory, tiny_cnn_spec, tmp_path):
    from mokd_analysis.suite import SuiteContext
    from mokd.core.features import FeatureCache
    from mokd.core.pipeline import FeatureOptions

    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    context = SuiteContext(checkpoint=path, out_dir=tmp_path, data="shapes:50",
                           features=FeatureOptions(cache=FeatureCache(None)), model=None, key=None, trust=False,
                           image_size=None, seed=0, echo=lambda message: None, coco_data="shapes-coco:8")
    status = run_step(next(step for step in STEPS if step.name == "coco"), context)
    assert status["status"] == "skipped" and "no standard ResNet" in status["reason"]
