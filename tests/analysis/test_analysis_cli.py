"""The analysis commands end to end on digits through click's test runner: results, figures, bad input."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mokd_analysis import style
from mokd_analysis.consistency import consistency_stats
from mokd.cli import mokd_eval
from checkpoint_files import CheckpointFactory
from mokd.core.data import eval_transform, open_dataset, parse_data_spec
from mokd_eval.knn import knn_classify
from mokd.core.registry import ALIASES

pytestmark = pytest.mark.slow  # runs the analyses end to end

FAST = ["--num-workers", "0", "--batch-size", "256"]
SMALL_VIT = dataclasses.replace(ALIASES["vit_t"], name="vit_small_test", embed_dim=48, depth=3, num_heads=3,
                                patch_size=8, img_size=32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    factory = CheckpointFactory(root)
    pair, pair_models = factory.mokd_native(ALIASES["r_tiny"], SMALL_VIT, name="pair.pth")
    dino, dino_models = factory.dino(ALIASES["r_tiny"], name="dino_cnn.pth")
    return {"root": root, "pair": pair, "pair_models": pair_models, "dino": dino, "dino_models": dino_models,
            "cache": root / "cache"}


def run(args, expect=0):
    result = CliRunner().invoke(mokd_eval, [str(a) for a in args])
    assert result.exit_code == expect, result.output
    return result


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def direct_knn_predictions(model, split_spec="digits"):
    spec = parse_data_spec(split_spec)
    transform, _ = eval_transform(spec)
    arrays = {}
    for split in ("train", "val"):
        dataset = open_dataset(spec, split, transform)
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        with torch.no_grad():
            arrays[split] = (model(images).numpy(), dataset.targets)
    outcome = knn_classify(*arrays["train"], *arrays["val"], num_classes=10, ks=(20,))
    return outcome.predictions[20], arrays["val"][1]


def test_consistency_matches_an_independent_recomputation(files):
    out = files["root"] / "results" / "consistency" / "pair.json"
    result = run(["consistency", files["pair"], "--control", files["dino"], "--data", "digits", "--out", out,
                  "--cache-dir", files["cache"], *FAST])
    assert "Prediction consistency on digits" in result.output and "control:" in result.output
    payload = json.loads(out.read_text())
    assert [entry["role"] for entry in payload["results"]] == ["A", "B", "control"]
    pred_a, labels = direct_knn_predictions(files["pair_models"]["teacher1"])
    pred_b, _ = direct_knn_predictions(files["pair_models"]["teacher2"])
    pred_c, _ = direct_knn_predictions(files["dino_models"]["teacher"])
    expected = consistency_stats(pred_a, pred_b, labels, num_classes=10)
    control = consistency_stats(pred_c, pred_b, labels, num_classes=10)
    for name in ("agreement", "cohen_kappa", "accuracy_a", "accuracy_b"):
        assert payload["consistency"]["pair"][name] == pytest.approx(expected[name])
        assert payload["consistency"]["control"][name] == pytest.approx(control[name])
    assert payload["consistency"]["pair"]["split"] == pytest.approx(expected["split"])


def test_tsne_draws_classes_writes_embedding_and_figure(files):
    out = files["root"] / "results" / "tsne" / "pair.json"
    run(["tsne", files["pair"], "--classes", "3", "--data", "digits", "--out", out, "--cache-dir", files["cache"],
         *FAST])
    payload = json.loads(out.read_text())
    classes = payload["tsne"]["classes"]
    assert len(classes) == 3 and classes == sorted(classes)
    embedding = np.load(payload["tsne"]["embedding"])
    labels = np.load(payload["tsne"]["labels"])
    assert embedding.shape == (2, len(labels), 2) and set(labels.tolist()) == set(classes)
    assert png_size(payload["tsne"]["figures"]["png"]) == style.pixel_size(style.COLUMN_WIDTH, 2.6)
    assert (out.parent / "pair.pdf").stat().st_size > 0


def test_mad_of_a_pair_with_random_init_controls(files):
    out = files["root"] / "results" / "mad" / "pair.json"
    result = run(["mad", files["pair"], "--random-init", "--images", "6", "--data", "digits", "--out", out])
    assert "Mean attention distance" in result.output
    payload = json.loads(out.read_text())
    labels = [entry["metrics"]["mad"]["label"] for entry in payload["results"]]
    assert labels == ["pair:teacher1", "pair:teacher2", "random init (r_tiny)", "random init (vit_small_test)"]
    vit = payload["results"][1]["metrics"]["mad"]
    assert np.asarray(vit["px"]).shape == (3, 3) and vit["layers"] == ["1", "2", "3"]
    cnn = payload["results"][0]["metrics"]["mad"]
    assert cnn["layers"] == ["res2", "res3", "res4", "res5"]
    # every value is a distance on a 4x4 grid of 8 px patches (ViT) or within the 32 px image (ResNet)
    assert 0 < min(min(row) for row in vit["px"]) and max(max(row) for row in vit["px"]) < 8 * 3 * 2 ** 0.5
    assert len(payload["config"]["image_indices"]) == 6
    assert png_size(payload["figures"]["png"]) == style.pixel_size(style.TEXT_WIDTH, 2.4)
    assert (out.parent / "pair.pdf").stat().st_size > 0


def test_mad_without_a_checkpoint_measures_the_random_init_model(files):
    out = files["root"] / "results" / "mad" / "random.json"
    run(["mad", "--model", "r_tiny", "--images", "2", "--data", "digits", "--out", out])
    payload = json.loads(out.read_text())
    assert [entry["key"] for entry in payload["results"]] == ["random init"]
    assert png_size(payload["figures"]["png"]) == style.pixel_size(style.COLUMN_WIDTH, 2.4)


def test_attention_maps_of_any_layer(files):
    out = files["root"] / "results" / "attention" / "pair.json"
    run(["attention", files["pair"], "--layer", "2", "--images", "2", "--data", "digits", "--out", out])
    payload = json.loads(out.read_text())
    (entry,) = payload["results"]
    assert entry["key"] == "teacher2" and entry["metrics"]["attention"]["layer"] == 2
    maps = np.load(entry["metrics"]["attention"]["maps"])
    assert maps.shape == (2, 3, 4, 4) and np.all(maps >= 0)
    width, height = png_size(entry["metrics"]["attention"]["figure"]["png"])
    cell = style.TEXT_WIDTH / 4
    assert (width, height) == style.pixel_size(style.TEXT_WIDTH, 2 * cell + 0.45)


def test_report_over_the_commands_results(files):
    out_dir = files["root"] / "report"
    run(["report", files["root"] / "results", "-o", out_dir])
    text = (out_dir / "report.md").read_text()
    assert "Table 9" in text and "pair:teacher1 vs pair:teacher2" in text
    assert "![Mean attention distance" in text and "(../results/mad/pair.png)" in text
    assert (out_dir / "tables" / "table9.tex").read_text().startswith("% Table 9")


def one_line_error(result) -> str:
    """The error is the last line of the output, on one line, without a traceback."""
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [lines[-1]] and "Traceback" not in result.output, result.output
    return lines[-1]


def test_attention_needs_a_vit(files, tmp_path):
    out = tmp_path / "a.json"
    result = run(["attention", files["dino"], "--data", "digits", "--out", out], expect=2)
    assert "no ViT" in one_line_error(result)
    assert not out.exists() and not (tmp_path / "a.png").exists()


def test_more_classes_than_the_dataset_is_refused(files, tmp_path):
    out = tmp_path / "t.json"
    result = run(["tsne", files["dino"], "--classes", "11", "--data", "digits", "--out", out,
                  "--cache-dir", files["cache"], *FAST], expect=2)
    assert "has 10 classes" in one_line_error(result)
    assert list(tmp_path.iterdir()) == []


def test_report_of_an_empty_or_foreign_directory_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no JSON files" in one_line_error(run(["report", tmp_path / "empty", "-o", tmp_path / "r"], expect=2))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.json").write_text("[1, 2]")
    assert "none written by mokd-eval" in one_line_error(
        run(["report", tmp_path / "foreign", "-o", tmp_path / "r"], expect=2))
    assert not (tmp_path / "r").exists()


def test_an_unwritable_output_fails_before_any_work(files, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run(["mad", files["pair"], "--out", blocker / "sub" / "m.json"], expect=2)
    assert "cannot be created because" in one_line_error(result)


def test_a_single_model_checkpoint_alone_cannot_be_compared(files, tmp_path):
    result = run(["consistency", files["dino"], "--data", "digits", "--out", tmp_path / "c.json",
                  "--cache-dir", files["cache"], *FAST], expect=2)
    assert "give a second checkpoint" in one_line_error(result)


@pytest.mark.parametrize("command,extra", [("consistency", []), ("tsne", ["--classes", "3"]),
                                           ("mad", ["--images", "4"]), ("attention", ["--images", "2"])])
def test_the_analyses_evaluate_at_the_checkpoints_training_crop(files, tmp_path, command, extra):
    """A checkpoint trained on 16 px crops is analysed at 16 px unless --image-size says otherwise, and the
    results say where the resolution came from (as k-NN and the supervised protocols do)."""
    trained_at_16, _ = CheckpointFactory(tmp_path).mokd_native(ALIASES["r_tiny"], SMALL_VIT, name="at16.pth",
                                                               config={"img_size": 16})
    common = [command, trained_at_16, "--data", "digits", *extra]
    if command in ("consistency", "tsne"):  # the commands on frozen features
        common += ["--num-workers", "0", "--cache-dir", tmp_path / "cache"]
    for size_args, side, source in (([], 16, "the checkpoint's training crop size"), (["--image-size", "32"], 32,
                                                                                       "--image-size")):
        out = tmp_path / f"{command}-{side}.json"
        result = run([*common, *size_args, "--out", out])
        assert f"resolution: {side} px ({source})" in result.output
        protocol = json.loads(out.read_text())["protocol"]
        assert (protocol["image_size"], protocol["image_size_from"]) == (side, source)
