"""Issue 17: every default resolves to the paper's protocol (A.2-A.5), read from the resolved settings, and
`suite --plan` shows them without running anything."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from mokd.cli import mokd_eval
from mokd_eval.detection.coco_eval import CocoSettings
from mokd.core.errors import MokdError
from mokd_eval.linear import protocol_feature
from mokd_eval.linear_eval import linear_preset, linear_protocol
from mokd.core.pipeline import Resolution, evaluation_resolution
from mokd_eval.protocols import TrainOptions, paper_verdict, resolve_settings, selection_text
from mokd.core.registry import ALIASES

IMAGENET_TRAIN = 1_281_167


def entry(arch: str, config: dict | None = None) -> SimpleNamespace:
    """What the protocol functions read of a loaded model: its spec and its checkpoint's stored config."""
    return SimpleNamespace(spec=ALIASES[arch], key=arch, checkpoint=SimpleNamespace(meta={"config": config or {}}))


@pytest.mark.parametrize("arch, per_256, effective", [("r50", 0.01, 0.08), ("vit_s", 0.001, 0.008)])
def test_the_default_linear_probe_is_a2_at_batch_2048(arch, per_256, effective):
    model = entry(arch)
    options = TrainOptions()
    preset = linear_preset(model)
    settings, _ = resolve_settings(preset, options, IMAGENET_TRAIN)
    record = linear_protocol(model, settings, preset.lr, selection_text((preset.lr,), options),
                             protocol_feature(model.spec), 224, Resolution(None, "the dataset's default"))
    assert record["global_batch"] == 2048 and record["epochs"] == 100 and record["warmup_epochs"] == 10
    assert record["lr_per_256"] == per_256 and record["lr"] == pytest.approx(effective)
    assert record["precision"] == "fp32" and record["augmentation"] == "random-resized-crop+flip"
    assert record["paper"] is True and record["differs"] == []


def test_a_smaller_batch_keeps_the_rate_per_256_and_is_off_protocol():
    model = entry("r50")
    options = TrainOptions(batch_size=256)
    preset = linear_preset(model)
    settings, _ = resolve_settings(preset, options, IMAGENET_TRAIN)
    record = linear_protocol(model, settings, preset.lr, "fixed", protocol_feature(model.spec), 224,
                             Resolution(None, "x"))
    assert record["lr"] == pytest.approx(0.01) and record["differs"] == ["global_batch", "lr"]


def test_small_scale_sizes_batches_to_eight_steps_per_epoch():
    preset = linear_preset(entry("r50"))
    settings, _ = resolve_settings(preset, TrainOptions(scale="small"), 1437)
    assert settings.batch_size == 180  # ceil(1437 / 8)
    paper, _ = resolve_settings(preset, TrainOptions(scale="small"), IMAGENET_TRAIN)
    assert paper.batch_size == 2048  # a large dataset keeps the paper's batch


def test_paper_verdict_names_the_fields_that_differ():
    verdict = paper_verdict({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 3, "d": 4})
    assert verdict["paper"] is False and verdict["differs"] == ["b", "d"]
    assert paper_verdict({"a": 1}, {"a": 1})["paper"] is True


def test_coco_defaults_are_the_2x_schedule_and_detectron2s_stock_head():
    settings = CocoSettings(backbone="r34", data="x")
    assert settings.iters == 180_000 and settings.res5_head == "d2-bottleneck" and settings.precision == "fp32"
    from mokd_eval.detection.train import schedule_iters

    assert schedule_iters(None, None) == 180_000 and schedule_iters("1x", None) == 90_000  # `coco` without --schedule


def test_the_resolution_defaults_to_the_checkpoints_training_crop():
    tiny = [entry("r_tiny", {"img_size": 16})]
    assert evaluation_resolution(tiny, None) == Resolution(16, "the checkpoint's training crop size")
    assert evaluation_resolution(tiny, 32).size == 32
    assert evaluation_resolution([entry("r_tiny")], None).size is None


def test_reduced_precision_is_refused_on_a_cpu():
    from mokd.core.training_loop import autocast_for

    with pytest.raises(MokdError, match="needs a CUDA device"):
        autocast_for(torch.device("cpu"), "bf16")
    context, scaler = autocast_for(torch.device("cpu"), "fp32")
    assert scaler is None


def test_suite_plan_shows_180k_coco_iterations_and_the_stock_head_and_runs_nothing(checkpoint_factory, tmp_path):
    vit = dataclasses.replace(ALIASES["vit_t"], name="vit_small_test", embed_dim=48, depth=2, num_heads=3,
                              patch_size=8, img_size=32)
    path, _ = checkpoint_factory.mokd_native(ALIASES["r18"], vit, name="pair.pth")
    splits = tmp_path / "splits"
    splits.mkdir()
    out = tmp_path / "suite"
    args = ["suite", str(path), "--data", "shapes:100", "--coco-data", "shapes-coco:4:64", "--out-dir", str(out),
            "--plan", "--skip", "tsne"]
    refused = CliRunner().invoke(mokd_eval, [*args, "--semisup-splits", str(splits)])
    assert refused.exit_code == 2 and "1percent.txt" in refused.output
    result = CliRunner().invoke(mokd_eval, args)
    assert result.exit_code == 0, result.output
    blocks = result.output.split("== ")
    coco = next(block for block in blocks if block.startswith("coco"))
    detector = json.loads(coco.splitlines()[-1])
    assert detector["iters"] == 180_000 and detector["res5_head"] == "d2-bottleneck" and detector["schedule"] == "2x"
    assert "OFF-PROTOCOL" in coco and "train_sizes" in coco  # shapes-coco's sizes are not A.5's
    linear = next(block for block in blocks if block.startswith("linear"))
    assert '"lr_per_256": 0.01' in linear and '"lr_per_256": 0.001' in linear and '"global_batch": 80' in linear
    semisup = next(block for block in blocks if block.startswith("semisup1"))
    assert '"split_source": "stratified, seed 0"' in semisup and "split_kind" in semisup
    assert "tsne: skipped (--skip)" in result.output
    assert not out.exists()  # nothing ran, nothing was written


def test_kfold_folds_cover_every_item_once_and_split_each_class_evenly():
    import numpy as np

    from mokd_eval.splits import kfold_split

    labels = np.repeat(np.arange(3), [10, 7, 1])
    folds = kfold_split(labels, 5, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(18))
    for label, size in ((0, 10), (1, 7)):
        per_fold = [int((labels[fold] == label).sum()) for fold in folds]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == size


def test_cross_validated_choice_is_the_best_mean_over_the_folds():
    import numpy as np

    from mokd.core.features import FeatureKind
    from mokd_eval.linear import cross_validated_sweep, train_head_sweep
    from mokd_eval.splits import kfold_split

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 15)
    features = (rng.normal(size=(60, 8)) + np.eye(4, 8)[labels] * 2).astype(np.float32)
    spec, lrs = ALIASES["r_tiny"], [0.001, 1.0, 30.0]
    spec = dataclasses.replace(spec, widths=(1, 2, 4, 8))  # feature_dim 8
    common = {"spec": spec, "source": FeatureKind(), "num_classes": 4, "epochs": 3, "batch_size": 16,
              "warmup_epochs": 0, "seed": 0}
    folds = kfold_split(labels, 5, seed=0)
    result = cross_validated_sweep(features, labels, folds, variants=[FeatureKind()], lrs=lrs, checkpoint_dir=None,
                                   **common)
    every = np.arange(60)
    means = np.mean([[head["heldout_top1"] for head in train_head_sweep(
        features, labels, np.setdiff1d(every, fold), fold, variants=[FeatureKind()], lrs=lrs, **common).heads]
        for fold in folds], axis=0)
    assert [head["heldout_top1"] for head in result.heads] == pytest.approx(means.tolist())
    assert result.heads[result.winner]["lr"] == lrs[int(np.argmax(means))]
    assert result.weight.shape == (4, 8)


def test_suite_passes_simclr_lists_from_the_splits_folder(tmp_path):
    from mokd_analysis.suite import SuiteContext
    from mokd.core.features import FeatureCache
    from mokd.core.pipeline import FeatureOptions, RunSettings

    context = SuiteContext(checkpoint=tmp_path / "c.pth", out_dir=tmp_path,
                           run=RunSettings(data="digits", echo=lambda message: None),
                           features=FeatureOptions(cache=FeatureCache(None)), semisup_splits=tmp_path / "splits",
                           scale="small")
    assert context.split_file(1) == tmp_path / "splits" / "1percent.txt"
    assert context.split_file(10) == tmp_path / "splits" / "10percent.txt"
    assert context.train_options().scale == "small"
    assert context.settings("linear")["scale"] == "small"  # another scale is another result, never reused
