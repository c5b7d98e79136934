"""Issue 18, class 7: every message points the right way, and every suggestion it makes works when followed
(the tests follow them): export names loaders that exist, mokd-train has the --skip-bad-images it suggests,
split files and $MOKD_DATA are named as what they are, the detector's divergence advice fits its norm."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from mokd.cli import mokd_eval, mokd_train
from mokd.core.data import parse_data_spec
from mokd_eval.detection.train import divergence_message
from mokd.core.errors import MokdError
from mokd.core.registry import ALIASES
from mokd_eval.splits import read_split_file
from tests.cli.test_hardening_tracebacks import assert_one_line_error, image_folder

pytestmark = pytest.mark.slow  # runs every command a message suggests


def export(tmp_path, checkpoint, fmt: str, *extra: str):
    target = tmp_path / f"{fmt}.pth"
    result = CliRunner().invoke(mokd_eval, ["export", str(checkpoint), "--format", fmt, "-o", str(target),
                                            "--out", str(tmp_path / f"{fmt}.json"), *extra])
    return result, target


def loads_into(output: str) -> str:
    return re.search(r"loads into (.+)$", output.strip().splitlines()[-2]).group(1)


def build(expression: str) -> nn.Module:
    """Evaluate the constructor an export message names, importing its top-level modules."""
    modules = {name: importlib.import_module(name) for name in ("torchvision", "timm", "mokd", "mokd_eval")}
    importlib.import_module("mokd.core.registry")
    importlib.import_module("torchvision.models")
    return eval(expression, modules)  # noqa: S307 - our own message, built from known names


@pytest.mark.parametrize("arch,fmt", [("r18", "torchvision"), ("r18", "timm"), ("r_tiny", "timm"),
                                      ("r_tiny", "torchvision"), ("vit_mini", "timm")])
def test_export_names_a_loader_that_takes_the_file(tmp_path, checkpoint_factory, arch, fmt):
    path, _ = checkpoint_factory.dino(ALIASES[arch])
    result, target = export(tmp_path, path, fmt)
    assert result.exit_code == 0, result.output
    text = loads_into(result.output)
    state = torch.load(target, weights_only=True)
    if text.startswith("no stock"):
        assert arch in ("r_tiny", "vit_mini")
        module = build(text.split(": ", 1)[1].removesuffix(".load_state_dict"))
    else:
        constructor = re.match(r"(\S+\(.*?\))", text).group(1)
        module = build(constructor)
        if fmt == "torchvision":
            module.fc = nn.Identity()
    module.load_state_dict(state, strict=True)  # the suggestion works


def test_detectron2_export_of_a_net_no_detectron2_config_builds_is_refused(tmp_path, checkpoint_factory):
    path, _ = checkpoint_factory.dino(ALIASES["r_tiny"])
    result, target = export(tmp_path, path, "detectron2")
    assert_one_line_error(result, "--format detectron2", "r_tiny", "use --format timm")
    assert not target.exists()
    follow, _ = export(tmp_path, path, "timm")
    assert follow.exit_code == 0, follow.output


def test_mokd_train_has_the_skip_bad_images_it_suggests(tmp_path):
    data = image_folder(tmp_path / "data", per_class=4)
    (data / "train" / "a" / "broken.png").write_bytes(b"not a png")
    # one step of all 9 images (8 + the broken one), so the broken one is read
    args = ["--preset", "tiny", "--data", f"imagefolder:{data}", "--batch-size", "9", "--epochs", "1",
            "--warmup-epochs", "0", "--num-workers", "0", "--device", "cpu", "--output-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(mokd_train, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    error = result.output.split("error: ")[-1]  # the progress bar may share its line
    assert "broken.png" in error and "pass --skip-bad-images" in error
    assert not (tmp_path / "run" / "checkpoint.pth").exists()
    result = CliRunner().invoke(mokd_train, [*args, "--skip-bad-images"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "checkpoint.pth").exists()


def test_split_file_messages_name_the_option_and_a_bom_is_not_a_name(tmp_path):
    with pytest.raises(MokdError, match=f"--split-file {tmp_path} is a directory"):
        read_split_file(tmp_path, ["a.png"], percent=None)
    with pytest.raises(MokdError, match="--split-file .* does not exist"):
        read_split_file(tmp_path / "none.txt", ["a.png"], percent=None)
    split = tmp_path / "split.txt"
    split.write_bytes("\ufeffb.png\r\na.png\r\n".encode("utf-8"))
    assert read_split_file(split, ["a.png", "b.png", "c.png"], percent=None).tolist() == [0, 1]


def test_a_bad_mokd_data_is_reported_as_the_variable(monkeypatch):
    monkeypatch.setenv("MOKD_DATA", "imagenet:/nowhere")
    with pytest.raises(MokdError, match=r"^\$MOKD_DATA \(used when --data is not given\) 'imagenet:/nowhere'"):
        parse_data_spec(None)
    with pytest.raises(MokdError, match=r"^--data 'bogus'"):
        parse_data_spec("bogus")


def test_divergence_advice_suggests_syncbn_only_to_a_frozen_bn_run():
    frozen = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4))
    synced = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert "--norm syncbn" in divergence_message(float("nan"), 3, frozen)
    message = divergence_message(float("nan"), 3, synced)
    assert "syncbn" not in message and "lower --lr" in message and "iteration 3" in message


def test_the_one_line_errors_of_numbers_name_the_flag_the_user_typed(tmp_path):
    result = CliRunner().invoke(mokd_eval, ["knn", "x.pth", "--temperature", "nan", "--out", str(tmp_path / "r.json")])
    assert_one_line_error(result, "--temperature nan is not a finite number")
