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
