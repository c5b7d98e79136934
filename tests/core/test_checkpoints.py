"""The checkpoint loader: every format loads strictly to the exact source weights, every bad input
is a one-line MokdError, and nothing is unpickled beyond tensors unless the user trusts the file."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import types
import warnings

import pytest
import safetensors.torch
import torch
import torchvision
from torch import nn

from mokd.core.checkpoints import (
    LoadedBackbone,
    file_sha256,
    infer_arch,
    inspect_checkpoint,
    load_backbones,
    read_checkpoint,
)
from mokd.core.errors import MokdError
from mokd.core.registry import ALIASES, ArchSpec, meta_backbone


class SidecarObject:
    """Stands for any pickled object that is not a tensor: unpickling it means importing code."""


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run faster on one thread than with OpenMP hand-offs; restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_backbone(loaded: LoadedBackbone, source: nn.Module, img_size: int) -> None:
    """Every parameter and buffer equal, and the same output as the source model on one input."""
    loaded_state, source_state = loaded.module.state_dict(), source.state_dict()
    assert loaded_state.keys() == source_state.keys()
    for name, tensor in source_state.items():
        assert torch.equal(loaded_state[name], tensor), name
    torch.manual_seed(0)
    images = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        assert torch.equal(loaded.module(images), source(images))
    assert not loaded.module.training


def assert_pair_loads(path, sources: dict[str, nn.Module], keys: tuple[str, str]) -> list[LoadedBackbone]:
    """A pair checkpoint gives its two models under `keys`, each identical to its source."""
    pair = load_backbones(path)
    assert tuple(entry.key for entry in pair) == keys
    for entry in pair:
        assert_same_backbone(entry, sources[entry.key], 32)
    return pair


def test_official_mokd_pair_loads_both_teachers(checkpoint_factory, tiny_cnn_spec, tiny_vit_spec):
    path, sources = checkpoint_factory.official_mokd(tiny_cnn_spec, tiny_vit_spec)
    cnn, vit = assert_pair_loads(path, sources, ("teacher_cnn", "teacher_vit"))
    assert cnn.spec == tiny_cnn_spec and vit.spec == tiny_vit_spec
    n_cnn = len(sources["teacher_cnn"].state_dict())
    assert cnn.report.startswith(f"teacher_cnn: loaded {n_cnn}/{n_cnn} backbone tensors strictly (inferred: r_tiny")
    saved_heads = [n for n in torch.load(path, weights_only=True)["teacher_cnn"] if ".backbone." not in f".{n}"]
    assert f"set aside {len(saved_heads)} head tensors (head.*, transhead.*)" in cnn.report
    assert "inferred: vit[dim=192,depth=12,patch=4]" in vit.report and "heads assumed" in vit.report
    ckpt = cnn.checkpoint
    assert ckpt.format == "mokd-official" and ckpt.epoch == 7
    assert ckpt.meta["arch_cnn"] == "resnet_tiny" and ckpt.default_keys == ["teacher_cnn", "teacher_vit"]
    assert ckpt.entries["teacher_cnn"].full_state["transhead.patch_embed.weight"].shape == (192, 128, 1, 1)


def test_official_mokd_student_key_strips_module_prefix(checkpoint_factory, tiny_cnn_spec, tiny_vit_spec):
    path, sources = checkpoint_factory.official_mokd(tiny_cnn_spec, tiny_vit_spec)
    (student,) = load_backbones(path, key="student_vit")
    assert_same_backbone(student, sources["student_vit"], 32)
    assert not any(name.startswith("module.") for name in student.checkpoint.entries["student_vit"].full_state)


@pytest.mark.parametrize("spec_fixture", ["tiny_vit_spec", "tiny_cnn_spec"])
def test_dino_teacher_and_student(checkpoint_factory, spec_fixture, request):
    spec = request.getfixturevalue(spec_fixture)
    path, sources = checkpoint_factory.dino(spec)
    (teacher,) = load_backbones(path)
    assert teacher.key == "teacher"
    assert_same_backbone(teacher, sources["teacher"], 32)
    (student,) = load_backbones(path, key="student")
    assert_same_backbone(student, sources["student"], 32)
    ckpt = teacher.checkpoint
    assert ckpt.format == "dino" and ckpt.epoch == 12
    assert ckpt.meta["args"]["patch_size"] == spec.patch_size and ckpt.meta["args"]["lr"] == 5e-4
    assert ckpt.entries["teacher"].head_keys[0].startswith("head.mlp.0")


@pytest.mark.parametrize("mlp", [True, False])
def test_moco_query_encoder_default_fc_set_aside(checkpoint_factory, tiny_cnn_spec, mlp):
    path, sources = checkpoint_factory.moco(tiny_cnn_spec, mlp=mlp)
    (query,) = load_backbones(path)
    assert query.key == "encoder_q" and query.checkpoint.format == "moco"
    assert_same_backbone(query, sources["encoder_q"], 32)
    expected_heads = ["fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"] if mlp else ["fc.weight", "fc.bias"]
    assert query.checkpoint.entries["encoder_q"].head_keys == expected_heads
    assert query.checkpoint.meta["arch"] == "resnet_tiny" and query.checkpoint.epoch == 200
    (key_encoder,) = load_backbones(path, key="encoder_k")
    assert_same_backbone(key_encoder, sources["encoder_k"], 32)


@pytest.fixture(scope="module")
def torchvision_resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.mark.parametrize(("wrapper", "module_prefix"), [(None, False), ("model", False), ("state_dict", True)])
def test_torchvision_resnet18_state_dict(tmp_path, torchvision_resnet18, wrapper, module_prefix):
    state = torchvision_resnet18.state_dict()
    state = {f"module.{name}": tensor for name, tensor in state.items()} if module_prefix else state
    path = tmp_path / "resnet18.pth"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 90}, path)
    (loaded,) = load_backbones(path)
    assert loaded.key == "model" and loaded.spec == ALIASES["r18"]
    assert loaded.checkpoint.format == "state_dict"
    assert "set aside 2 head tensors (fc.*)" in loaded.report
    loaded_state = loaded.module.state_dict()
    for name, tensor in torchvision_resnet18.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(loaded_state[name], tensor), name
    features = nn.Sequential(*list(torchvision_resnet18.children())[:-1], nn.Flatten())  # everything but fc
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(images), features(images))


def test_forced_model_name_must_agree_and_is_reported(tmp_path, torchvision_resnet18):
    path = tmp_path / "r18.pth"
    torch.save(torchvision_resnet18.state_dict(), path)
    (loaded,) = load_backbones(path, model="resnet18")
    assert loaded.spec == ALIASES["r18"] and "--model: r18" in loaded.report
    with pytest.raises(MokdError, match=r"does not match r34 .*missing \(layer1\.2\..*--model"):
        load_backbones(path, model="r34")


def test_mokd_native_pair_uses_stored_specs(checkpoint_factory, tiny_cnn_spec, tiny_vit_spec):
    path, sources = checkpoint_factory.mokd_native(tiny_cnn_spec, tiny_vit_spec)
    net1, net2 = assert_pair_loads(path, sources, ("teacher1", "teacher2"))
    assert "stored: r_tiny" in net1.report
    ckpt = net1.checkpoint
    assert ckpt.format == "mokd" and ckpt.meta["mode"] == "pair" and ckpt.epoch == 3
    assert not ckpt.entries["teacher2"].inferred and ckpt.entries["teacher2"].spec == tiny_vit_spec
    (student,) = load_backbones(path, key="student2")
    assert_same_backbone(student, sources["student2"], 32)


def test_mokd_native_single_model(checkpoint_factory, tiny_cnn_spec):
    path, sources = checkpoint_factory.mokd_native(tiny_cnn_spec)
    (net1,) = load_backbones(path)
    assert net1.key == "teacher1"
    assert_same_backbone(net1, sources["teacher1"], 32)


def test_safetensors_plain_vit(tmp_path, checkpoint_factory, tiny_vit_spec):
    source = checkpoint_factory.backbone(tiny_vit_spec)
    path = tmp_path / "vit.safetensors"
    tensors = {**source.state_dict(), "head.weight": torch.randn(10, 192), "head.bias": torch.randn(10)}
    safetensors.torch.save_file(tensors, str(path), metadata={"source": "unit-test"})
    (loaded,) = load_backbones(path)
    assert loaded.checkpoint.format == "safetensors" and loaded.checkpoint.meta["source"] == "unit-test"
    assert sorted(loaded.checkpoint.entries["model"].head_keys) == ["head.bias", "head.weight"]
    assert_same_backbone(loaded, source, 32)


def test_img_size_override_keeps_the_position_embedding(tmp_path, checkpoint_factory, tiny_vit_spec):
    source = checkpoint_factory.backbone(tiny_vit_spec)
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    (loaded,) = load_backbones(path, img_size=64)
    assert loaded.spec.img_size == 64
    assert torch.equal(loaded.module.pos_embed, source.pos_embed)  # 1 + 8x8 tokens, not resampled on load
    assert "resampled on the fly for 64px" in loaded.report
    assert_same_backbone(loaded, source, 64)
    with pytest.raises(MokdError, match="not a multiple of .*patch size 4"):
        load_backbones(path, img_size=30)


def _meta_state(spec: ArchSpec) -> dict[str, torch.Tensor]:
    return meta_backbone(spec).state_dict()


@pytest.mark.parametrize("alias", ["r18", "r34", "r50", "r101", "r152", "r_tiny", "vit_t", "vit_s", "vit_b"])
def test_infer_arch_recovers_every_alias(alias):
    assert infer_arch(_meta_state(ALIASES[alias])) == ALIASES[alias]


def test_infer_arch_names_non_alias_shapes(tiny_vit_spec):
    vit = infer_arch(_meta_state(tiny_vit_spec))
    assert (vit.name, vit.img_size, vit.patch_size, vit.num_heads) == ("vit[dim=192,depth=12,patch=4]", 32, 4, 3)
    vit_96 = infer_arch(_meta_state(dataclasses.replace(ALIASES["vit_s"], img_size=96)))
    assert vit_96 == dataclasses.replace(ALIASES["vit_s"], img_size=96)
    narrow = ArchSpec(name="narrow", family="vit", img_size=32, embed_dim=96, depth=2, num_heads=1, patch_size=4)
    assert infer_arch(_meta_state(narrow)).num_heads == 2  # 48-wide heads are the closest to 64 that divide 96
    wide_stem = dataclasses.replace(ALIASES["r_tiny"], stem="imagenet")
    resnet = infer_arch(_meta_state(wide_stem))
    assert resnet == dataclasses.replace(wide_stem, name="resnet[1,1,1,1]", img_size=224)


def test_infer_arch_rejects_unknown_layouts(tiny_vit_spec):
    state = _meta_state(tiny_vit_spec)
    with pytest.raises(MokdError, match=r"not one class token plus a square patch grid"):
        infer_arch({**state, "pos_embed": torch.zeros(1, 60, 192)})
    with pytest.raises(MokdError, match="fc_norm"):
        infer_arch({**state, "fc_norm.weight": torch.zeros(192)})
    with pytest.raises(MokdError, match=r"unknown backbone layout .*first tensors: stem\.0\.weight"):
        infer_arch({"stem.0.weight": torch.zeros(3), "stages.0.weight": torch.zeros(3)})


def test_missing_path_directory_and_empty_file(tmp_path):
    with pytest.raises(MokdError, match="does not exist"):
        load_backbones(tmp_path / "missing.pth")
    with pytest.raises(MokdError, match="is a directory"):
        load_backbones(tmp_path)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(MokdError, match="empty file"):
        load_backbones(tmp_path / "empty.pth")


@pytest.mark.parametrize("damage", ["truncated", "text", "random bytes", "truncated safetensors"])
def test_damaged_files_are_one_line_errors(tmp_path, checkpoint_factory, tiny_cnn_spec, damage):
    state = checkpoint_factory.backbone(tiny_cnn_spec).state_dict()
    path = tmp_path / "damaged.pth"
    if damage.endswith("safetensors"):
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, path)
    data = path.read_bytes()
    contents = {"text": b"epoch,accuracy\n1,0.5\n", "random bytes": bytes(range(256)) * 8}
    path.write_bytes(contents.get(damage, data[: len(data) // 2]))
    with pytest.raises(MokdError, match="cannot be read") as error:
        load_backbones(path)
    assert "\n" not in str(error.value)


def test_missing_tensor_and_shape_mismatch(tmp_path, checkpoint_factory, tiny_cnn_spec, tiny_vit_spec):
    cnn_state = checkpoint_factory.backbone(tiny_cnn_spec).state_dict()
    del cnn_state["layer4.0.bn2.running_var"]
    torch.save(cnn_state, tmp_path / "cnn.pth")
    with pytest.raises(MokdError, match=r"1 missing \(layer4\.0\.bn2\.running_var\), 0 unexpected") as error:
        load_backbones(tmp_path / "cnn.pth")
    message = str(error.value)
    assert "prefixes in 'model': conv1., bn1., layer1." in message and "--key" in message and "\n" not in message
    vit_state = {**checkpoint_factory.backbone(tiny_vit_spec).state_dict(), "norm.weight": torch.ones(10)}
    torch.save(vit_state, tmp_path / "vit.pth")
    with pytest.raises(MokdError, match=r"1 shape mismatches \(norm\.weight: file \[10\] vs model \[192\]\)"):
        load_backbones(tmp_path / "vit.pth")


def test_unknown_prefix_and_bad_key(checkpoint_factory, tiny_cnn_spec, tiny_vit_spec):
    path, _ = checkpoint_factory.official_mokd(tiny_cnn_spec, tiny_vit_spec)
    with pytest.raises(MokdError, match="available keys are student_cnn, teacher_cnn, student_vit, teacher_vit$"):
        load_backbones(path, key="teacher")
    ckpt = torch.load(path, weights_only=True)
    ckpt["teacher_cnn"]["module.projector.weight"] = torch.zeros(4, 4)
    torch.save(ckpt, path)
    with pytest.raises(MokdError, match=r"'teacher_cnn' holds tensors under unknown prefixes projector\."):
        load_backbones(path)


def test_unknown_top_level_layout(tmp_path):
    torch.save({"weights": [1, 2, 3], "name": "x"}, tmp_path / "odd.pth")
    with pytest.raises(MokdError, match="unknown layout .*top-level keys: weights, name"):
        read_checkpoint(tmp_path / "odd.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(MokdError, match="holds list, not a dict of model weights"):
        read_checkpoint(tmp_path / "list.pth")


def test_damaged_mokd_native_file(checkpoint_factory, tiny_cnn_spec):
    path, _ = checkpoint_factory.mokd_native(tiny_cnn_spec)
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "mokd_format": 2}, path)
    with pytest.raises(MokdError, match="format 2 is not supported"):
        read_checkpoint(path)
    torch.save({**ckpt, "archs": {}}, path)
    with pytest.raises(MokdError, match=r"has 'teacher1' but no archs\['1'\]"):
        read_checkpoint(path)


@pytest.mark.parametrize("payload", [SidecarObject(), functools.partial(print, "side effect")],
                         ids=["class", "partial"])
def test_pickled_code_needs_trust(tmp_path, checkpoint_factory, tiny_cnn_spec, payload):
    source = checkpoint_factory.backbone(tiny_cnn_spec)
    path = tmp_path / "sidecar.pth"
    torch.save({"state_dict": source.state_dict(), "extra": payload}, path)
    offending = "SidecarObject" if isinstance(payload, SidecarObject) else "functools.partial"
    with pytest.raises(MokdError, match=rf"global \S*{offending}, .*--trust-checkpoint"):
        load_backbones(path)
    with pytest.warns(UserWarning, match="trust-checkpoint"):
        (loaded,) = load_backbones(path, trust=True)
    assert "WARNING: unpickled with --trust-checkpoint" in loaded.report
    assert_same_backbone(loaded, source, 32)


def test_a_code_executing_global_is_named_not_called_corrupt(tmp_path, checkpoint_factory, tiny_cnn_spec):
    path = tmp_path / "hostile.pth"
    torch.save({"state_dict": checkpoint_factory.backbone(tiny_cnn_spec).state_dict(), "run": os.system}, path)
    with pytest.raises(MokdError) as caught:
        load_backbones(path)
    message = str(caught.value)
    assert f"global {os.system.__module__}.system" in message and "--trust-checkpoint" in message
    assert "corrupted" not in message


def test_a_file_that_cannot_load_even_with_trust_says_why(tmp_path, checkpoint_factory, tiny_cnn_spec, monkeypatch):
    module = types.ModuleType("vanished_training_code")

    class Config:
        pass

    Config.__module__, Config.__qualname__ = module.__name__, "Config"
    module.Config = Config
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = tmp_path / "foreign.pth"
    torch.save({"state_dict": checkpoint_factory.backbone(tiny_cnn_spec).state_dict(), "config": Config()}, path)
    monkeypatch.delitem(sys.modules, module.__name__)
    with pytest.warns(UserWarning), pytest.raises(MokdError, match=r"cannot be unpickled even with "
                                                                   r"--trust-checkpoint: it refers to "
                                                                   r"vanished_training_code.Config.*No module named"):
        load_backbones(path, trust=True)


def test_trust_is_unused_for_files_that_do_not_need_it(tmp_path, checkpoint_factory, tiny_cnn_spec):
    torch.save(checkpoint_factory.backbone(tiny_cnn_spec).state_dict(), tmp_path / "plain.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (loaded,) = load_backbones(tmp_path / "plain.pth", trust=True)
    assert "WARNING" not in loaded.report and "unpickled_with_trust" not in loaded.checkpoint.meta


def test_inspect_official_mokd(checkpoint_factory, tiny_cnn_spec, tiny_vit_spec):
    path, sources = checkpoint_factory.official_mokd(tiny_cnn_spec, tiny_vit_spec)
    saved = torch.load(path, weights_only=True)
    summary = inspect_checkpoint(path)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["format"] == "mokd-official" and summary["epoch"] == 7
    assert summary["default_keys"] == ["teacher_cnn", "teacher_vit"]
    assert "arch_cnn" in summary["top_level_keys"] and "loss_cnn_mlp_fn" in summary["top_level_keys"]
    models = {model["key"]: model for model in summary["models"]}
    assert list(models) == ["student_cnn", "teacher_cnn", "student_vit", "teacher_vit"]
    for key in ("teacher_cnn", "student_vit"):
        model, source = models[key], sources[key]
        assert model["backbone_params"] == sum(p.numel() for p in source.parameters())
        assert model["backbone_buffer_numel"] == sum(b.numel() for b in source.buffers())
        assert model["backbone_tensors"] == len(source.state_dict())
        heads = {name: t for name, t in saved[key].items() if not name.removeprefix("module.").startswith("backbone.")}
        assert model["head_params"] == sum(t.numel() for t in heads.values())
        assert model["head_tensors"] == len(heads) and model["head_prefixes"] == ["head.*", "transhead.*"]
        assert sorted(model["head_tensor_names"]) == sorted(name.removeprefix("module.") for name in heads)
        assert model["inferred"] and model["matches_arch"]
    assert models["teacher_cnn"]["arch"] == "r_tiny" and models["teacher_cnn"]["describe"].startswith("r_tiny (ResNet")
    assert models["teacher_vit"]["arch_spec"]["patch_size"] == 4


def test_file_sha256_matches_hashlib_and_follows_changes(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"a" * 3_000_000)
    assert file_sha256(path) == hashlib.sha256(b"a" * 3_000_000).hexdigest()
    path.write_bytes(b"b" * 10)
    assert file_sha256(path) == hashlib.sha256(b"b" * 10).hexdigest()
