"""`mokd-eval export`: detectron2 (MoCo naming) / torchvision / timm files that load strictly elsewhere."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import timm
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

import mokd.cli as cli
from checkpoint_files import CheckpointFactory
from mokd.core.registry import ALIASES

R18 = ALIASES["r18"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_vit_spec):
    """One official pair for the module: the exports read it and write elsewhere."""
    return CheckpointFactory(tmp_path_factory.mktemp("pair")).official_mokd(R18, tiny_vit_spec)


def _export(path, fmt, out, *extra):
    result = CliRunner().invoke(cli.mokd_eval, ["export", str(path), "--format", fmt, "-o", str(out),
                                                "--out", str(out) + ".json", *extra])
    return result


def test_detectron2_export_uses_moco_names(pair, tmp_path):
    path, sources = pair
    out = tmp_path / "r18.pkl"
    result = _export(path, "detectron2", out, "--key", "teacher_cnn")
    assert result.exit_code == 0, result.output
    with open(out, "rb") as handle:
        payload = pickle.load(handle)
    assert payload["matching_heuristics"] is True
    model = payload["model"]
    source = sources["teacher_cnn"].state_dict()
    pairs = {"stem.conv1.weight": "conv1.weight", "stem.conv1.norm.running_var": "bn1.running_var",
             "res2.1.conv2.norm.bias": "layer1.1.bn2.bias", "res3.0.shortcut.weight": "layer2.0.downsample.0.weight",
             "res3.0.shortcut.norm.running_mean": "layer2.0.downsample.1.running_mean",
             "res5.1.conv1.weight": "layer4.1.conv1.weight"}
    for d2_name, tv_name in pairs.items():
        assert isinstance(model[d2_name], np.ndarray)
        assert np.array_equal(model[d2_name], source[tv_name].numpy())
    assert len(model) == len([n for n in source if not n.endswith("num_batches_tracked")])
    assert not any("num_batches_tracked" in n for n in model)
    record = json.loads((tmp_path / "r18.pkl.json").read_text())
    assert record["results"][0]["export"]["format"] == "detectron2"


def test_detectron2_names_and_shapes_match_detectron2s_r_c4():
    """Where detectron2 is importable, its own R18/R50 C4 backbone + stock res5 have exactly these names/shapes."""
    pytest.importorskip("detectron2", reason="detectron2 is not installed (optional engine)")
    from detectron2.modeling import build_model

    from mokd_eval.detection.d2_engine import build_config
    from mokd_eval.detection.model import DetectorConfig
    from mokd_eval.detection.train import Solver
    from mokd_eval.export import detectron2_state
    from mokd.core.registry import build_backbone

    for depth, alias, head in ((18, "r18", "native"), (50, "r50", "d2-bottleneck")):
        cfg = build_config(depth=depth, num_classes=3, res5_head=head, norm="frozenbn", world_size=1, weights="",
                           train_sets=(), test_sets=(), detector=DetectorConfig(num_classes=3),
                           solver=Solver(iters=10), output_dir=".", device="cpu", num_workers=0, seed=0)
        d2_state = build_model(cfg).state_dict()
        exported = detectron2_state(build_backbone(ALIASES[alias]).state_dict())
        for name, array in exported.items():
            target = f"roi_heads.{name}" if name.startswith("res5.") else f"backbone.{name}"
            assert target in d2_state, name
            assert tuple(d2_state[target].shape) == array.shape, name
        d2_trunk = {n for n in d2_state if n.startswith("backbone.")}
        assert d2_trunk == {f"backbone.{n}" for n in exported if not n.startswith("res5.")}


def test_torchvision_and_timm_exports_load_strictly(pair, tmp_path):
    path, sources = pair
    source = sources["teacher_cnn"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source.eval()(x)
    assert _export(path, "torchvision", tmp_path / "tv.pth", "--key", "teacher_cnn").exit_code == 0
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    model.load_state_dict(torch.load(tmp_path / "tv.pth", weights_only=True), strict=True)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), expected, atol=1e-5)
    assert _export(path, "timm", tmp_path / "timm.pth", "--key", "teacher_cnn").exit_code == 0
    timm_model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    timm_model.load_state_dict(torch.load(tmp_path / "timm.pth", weights_only=True), strict=True)
    with torch.no_grad():
        assert torch.allclose(timm_model.eval()(x), expected, atol=1e-5)


def test_every_model_of_a_pair_and_vit_limits(pair, tmp_path):
    path, sources = pair
    result = _export(path, "timm", tmp_path / "both.pth")
    assert result.exit_code == 2 and "choose one with --key" in result.output
    result = _export(path, "detectron2", tmp_path / "vit.pkl", "--key", "teacher_vit")
    assert result.exit_code == 2 and "exports ResNets only" in result.output
    result = _export(path, "timm", tmp_path / "student.pth", "--key", "student_cnn")
    assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "student.pth", weights_only=True)
    assert torch.equal(state["layer4.1.conv2.weight"], sources["student_cnn"].layer4[1].conv2.weight)
