"""Issue 18, class 3: no silent wrong or degenerate result. 16-bit images are scaled, not clipped to white;
modes without a known range are refused like unreadable images; a directory link is never followed twice; t-SNE
records the perplexity it used; data that makes a metric trivially perfect is warned about and recorded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mokd_analysis.tsne import PERPLEXITY, effective_perplexity
from mokd.cli import mokd_eval
from mokd.core.data import UnsupportedImage, open_dataset, parse_data_spec, read_image
from tests.cli.test_hardening_tracebacks import assert_one_line_error, image_folder


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits(tmp_path):
    values = np.array([[0, 257, 1000], [32768, 65000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    pixels = np.asarray(read_image(str(tmp_path / "deep.png")))
    expected = np.array([[0, 1, 4], [128, 253, 255]], dtype=np.uint8)  # round(v / 257), by hand
    assert pixels.shape == (2, 3, 3)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], expected)


@pytest.mark.parametrize("array", [np.full((4, 4), 0.5, dtype=np.float32), np.full((4, 4), 70000, dtype=np.int32)])
def test_pixels_without_a_known_range_are_refused(tmp_path, array):
    Image.fromarray(array).save(tmp_path / "odd.tiff")
    with pytest.raises(UnsupportedImage, match="8 or 16 bits per channel"):
        read_image(str(tmp_path / "odd.tiff"))


def test_an_unsupported_image_in_a_folder_is_one_line_or_skipped(tmp_path, checkpoint_factory, tiny_cnn_spec):
    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    data = image_folder(tmp_path / "data")
    Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32)).save(data / "val" / "a" / "float.tiff")
    args = ["knn", str(path), "--data", f"imagefolder:{data}", "--k", "1", "--no-cache", "--num-workers", "0",
            "--out", str(tmp_path / "knn.json")]
    assert_one_line_error(CliRunner().invoke(mokd_eval, args), "float.tiff", "PIL mode F", "--skip-bad-images")
    result = CliRunner().invoke(mokd_eval, [*args, "--skip-bad-images"])
    assert result.exit_code == 0 and "skipped 1 unreadable images" in result.output, result.output


def test_a_directory_link_loop_counts_each_image_once(tmp_path):
    data = image_folder(tmp_path / "data", per_class=4)
    os.symlink("..", data / "train" / "a" / "up")  # a loop back to the split: a, b, a/up/a, ...
    os.symlink(".", data / "train" / "b" / "here")  # a loop onto itself
    (data / "train" / "a" / "deeper").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(data / "train" / "a" / "deeper" / "x.png")
    os.symlink(data / "train" / "a" / "deeper", data / "train" / "b" / "elsewhere")  # read once, by class a
    train = open_dataset(parse_data_spec(f"imagefolder:{data}"), "train")
    assert len(train) == 9
    names = [os.path.relpath(path, data / "train") for path, _ in train._folder.samples]
    assert names == ["a/0.png", "a/1.png", "a/2.png", "a/3.png", "a/deeper/x.png",
                     "b/0.png", "b/1.png", "b/2.png", "b/3.png"]
    assert train.targets.tolist() == [0] * 5 + [1] * 4


def test_tsne_perplexity_is_the_one_used():
    assert effective_perplexity(1000) == PERPLEXITY
    assert effective_perplexity(31) == pytest.approx(10.0)


def test_tsne_records_the_lowered_perplexity(tmp_path, checkpoint_factory, tiny_cnn_spec):
    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    out = tmp_path / "tsne.json"
    result = CliRunner().invoke(mokd_eval, ["tsne", str(path), "--data", "shapes:200", "--classes", "2", "--no-cache",
                                            "--num-workers", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    points = payload["results"][0]["metrics"]["tsne"]["points"]
    assert (points - 1) / 3 < PERPLEXITY
    assert payload["protocol"]["perplexity"] == pytest.approx((points - 1) / 3)
    assert payload["protocol"]["perplexity_requested"] == PERPLEXITY
    assert "perplexity lowered from 30" in result.output


@pytest.mark.parametrize("classes,warning", [("a", "top-1 and top-5 are 100 % by construction"),
                                             ("abc", "top-5 is 100 % by construction")])
def test_trivially_perfect_metrics_are_warned_about_and_recorded(tmp_path, checkpoint_factory, tiny_cnn_spec,
                                                                  classes, warning):
    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    data = image_folder(tmp_path / "data", per_class=2, classes=classes)
    out = tmp_path / "knn.json"
    result = CliRunner().invoke(mokd_eval, ["knn", str(path), "--data", f"imagefolder:{data}", "--k", "1",
                                            "--no-cache", "--num-workers", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"warning: imagefolder:{data} has {len(classes)} class" in result.output and warning in result.output
    assert any(warning in note for note in json.loads(out.read_text())["dataset"]["caveats"])


def training_folder_with_bad_entries(root: Path) -> Path:
    """8 readable training images and 4 bad entries: a file that is no image, a truncated PNG, a dangling link
    and a link to itself (plus a directory link back to its class folder, which is neither read twice nor bad)."""
    data = image_folder(root, per_class=4)
    (data / "train" / "a" / "broken.png").write_bytes(b"not a png")
    whole = (data / "train" / "a" / "0.png").read_bytes()
    (data / "train" / "a" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    os.symlink(data / "train" / "b" / "missing.png", data / "train" / "b" / "dangling.png")
    os.symlink("self.png", data / "train" / "b" / "self.png")
    os.symlink("..", data / "train" / "b" / "loop")
    return data


BAD_TRAINING_ENTRIES = 4


def epoch_records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [record for record in records if record["kind"] == "epoch"]


@pytest.mark.slow  # trains (two tiny epochs)
def test_mokd_train_counts_and_reports_the_replaced_images_exactly(tmp_path):
    from mokd.cli import mokd_train

    data = training_folder_with_bad_entries(tmp_path / "data")
    samples = 8 + BAD_TRAINING_ENTRIES
    run = tmp_path / "run"
    # one step of the whole split per epoch, read by two DataLoader workers (each counts its own samples)
    result = CliRunner().invoke(mokd_train, [
        "--preset", "tiny", "--data", f"imagefolder:{data}", "--batch-size", str(samples), "--epochs", "2",
        "--warmup-epochs", "0", "--num-workers", "2", "--device", "cpu", "--no-curves", "--output-dir", str(run),
        "--skip-bad-images"])
    assert result.exit_code == 0, result.output
    share = 100 * BAD_TRAINING_ENTRIES / samples
    assert [record["replaced_images"] for record in epoch_records(run)] == [BAD_TRAINING_ENTRIES] * 2
    assert all(any(f"{share:.1f} % of the training samples were unreadable" in warning
                   for warning in record["warnings"]) for record in epoch_records(run))
    assert result.output.count(f"--skip-bad-images: {BAD_TRAINING_ENTRIES} of {samples} samples ({share:.1f} %)") == 2
    assert (f"unreadable images replaced (--skip-bad-images): {2 * BAD_TRAINING_ENTRIES} samples of this run"
            in result.output)


def test_a_clean_split_reports_no_replaced_images():
    from mokd_train.data import REPLACED_WARNING_SHARE, replaced_images_report

    assert replaced_images_report(0, 100) == (None, None)
    line, warning = replaced_images_report(1, 100)
    assert "1 of 100 samples (1.0 %)" in line and warning is None  # below the warning share
    line, warning = replaced_images_report(round(100 * REPLACED_WARNING_SHARE), 100)
    assert warning is not None and "fix or remove" in warning


def _train_rank(rank: int, port: int, config) -> None:
    from mokd_train.engine import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import torch

    torch.set_num_threads(1)
    summary = train(config)
    assert summary["replaced_images"] == BAD_TRAINING_ENTRIES  # every rank knows the sum over ranks


@pytest.mark.slow  # spawns two training processes
def test_the_replaced_images_of_two_ranks_are_summed(tmp_path):
    import torch.multiprocessing as mp

    from mokd_train.config import resolve_config
    from tests.cli.test_hardening_runs import free_port

    data = training_folder_with_bad_entries(tmp_path / "data")
    run = tmp_path / "run"
    config = resolve_config("tiny", None, dict(
        output_dir=str(run), data=f"imagefolder:{data}", batch_size=8 + BAD_TRAINING_ENTRIES, epochs=1,
        warmup_epochs=0, num_workers=0, device="cpu", curves=False, skip_bad_images=True))
    mp.spawn(_train_rank, args=(free_port(), config), nprocs=2, join=True)
    assert [record["replaced_images"] for record in epoch_records(run)] == [BAD_TRAINING_ENTRIES]
