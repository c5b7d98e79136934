"""`suite`: the table of steps, honest skips, resumption, and the whole run end to end on digits."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mokd_analysis.suite import STEP_NAMES, STEPS, Step, SuiteContext, parse_skip, run_step
from mokd.cli import mokd_eval
from mokd.core.errors import MokdError
from mokd.core.features import FeatureCache
from mokd.core.pipeline import FeatureOptions, RunSettings
from mokd.core.registry import ALIASES

pytestmark = pytest.mark.slow  # runs every protocol end to end


def test_every_paper_step_is_in_the_table_in_order():
    assert STEP_NAMES == ("knn", "linear", "semisup1", "semisup10", "cifar10", "cifar100", "coco", "consistency",
                          "tsne", "mad", "report")


def test_unknown_skip_names_are_refused():
    assert parse_skip("linear, coco") == {"linear", "coco"}
    with pytest.raises(MokdError, match="unknown step"):
        parse_skip("linear,knnn")


def test_every_step_is_a_callable_taking_the_suite_context_and_returning_the_payload():
    import inspect
    import typing

    context = SuiteContext(checkpoint=Path("c.pth"), out_dir=Path("out"), run=RunSettings(data="digits"),
                           features=FeatureOptions(cache=FeatureCache(None)))
    for step in STEPS:
        for function in (step.run, step.skip_reason):
            assert callable(function), step.name
            inspect.signature(function).bind(context)  # accepts the suite context, and nothing else is required
        hints = typing.get_type_hints(step.run)
        assert hints["context"] is SuiteContext and hints["return"] == dict[str, typing.Any], step.name


def test_every_step_calls_its_command_logic_with_arguments_the_logic_takes(tmp_path, monkeypatch):
    import inspect

    from mokd_analysis import suite

    logic = ["run_knn", "run_linear", "run_semisup", "run_cifar", "run_coco", "run_consistency", "run_tsne", "run_mad"]
    called = []
    for name in logic:
        def checked(*args, original=getattr(suite, name), name=name, **kwargs):
            inspect.signature(original).bind(*args, **kwargs)  # a renamed or re-signed parameter fails here
            called.append(name)
            return {}
        monkeypatch.setattr(suite, name, checked)
    monkeypatch.setattr(suite, "_coco_backbone", lambda context: "r18")
    context = SuiteContext(checkpoint=tmp_path / "c.pth", out_dir=tmp_path, run=RunSettings(data="digits"),
                           features=FeatureOptions(cache=FeatureCache(None)), cifar_data="cifar",
                           coco_data="shapes-coco:8")
    for step in STEPS:
        assert step.run(context) == {}, step.name
    assert sorted(set(called)) == sorted(logic)


def test_a_step_runs_its_function_on_the_context_and_stores_the_payload(tmp_path):
    context = SuiteContext(checkpoint=tmp_path / "c.pth", out_dir=tmp_path, run=RunSettings(echo=lambda _: None),
                           features=FeatureOptions(cache=FeatureCache(None)))
    status = run_step(Step("echo", lambda given: {"command": "echo", "seed": given.run.seed}), context)
    assert status == {"step": "echo", "status": "done", "results": str(tmp_path / "echo" / "c.json"),
                      "skipped_images": 0}
    assert json.loads((tmp_path / "echo" / "c.json").read_text())["suite"]["settings"]["step"] == "echo"


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
    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    context = SuiteContext(checkpoint=path, out_dir=tmp_path,
                           run=RunSettings(data="shapes:50", echo=lambda message: None),
                           features=FeatureOptions(cache=FeatureCache(None)))
    status = run_step(next(step for step in STEPS if step.name == "consistency"), context)
    assert status["status"] == "skipped" and "needs a pair checkpoint" in status["reason"]


def test_coco_is_skipped_without_data_or_without_a_standard_resnet(checkpoint_factory, tiny_cnn_spec, tmp_path):
    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    context = SuiteContext(checkpoint=path, out_dir=tmp_path,
                           run=RunSettings(data="shapes:50", echo=lambda message: None),
                           features=FeatureOptions(cache=FeatureCache(None)), coco_data="shapes-coco:8")
    status = run_step(next(step for step in STEPS if step.name == "coco"), context)
    assert status["status"] == "skipped" and "no standard ResNet" in status["reason"]
