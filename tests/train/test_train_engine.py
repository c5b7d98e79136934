"""The training engine: config precedence, checkpoints, exact resumption, fallbacks, independence, export.

Runs use the `tiny` preset shrunk further (16 px globals, 8 px locals, 40 `shapes` images, K = 128) and,
where the ViT's size does not matter, timm's 6-block 64-d `test_vit`, so each run takes seconds on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mokd.core.checkpoints import load_backbones
from mokd.core.errors import MokdError
from mokd.core.registry import build_backbone
from mokd_train import checkpointing, losses
from mokd_train.config import PRESETS, TrainConfig, arch_specs, resolve_config, resolved_lambdas
from mokd_train.engine import pair_config, save_initial_checkpoint, train
from mokd_train.pair import MokdPair

pytestmark = pytest.mark.slow  # trains

STEPS_PER_EPOCH = 5  # shapes:50 has 40 train images; batch 8


def small_config(output_dir: Path, **overrides) -> TrainConfig:
    settings = dict(output_dir=str(output_dir), data="shapes:50", arch2="test_vit", img_size=16, local_size=8,
                    n_local=2, batch_size=8, epochs=2, warmup_epochs=1, out_dim=128, mlp_hidden_dim=64,
                    mlp_bottleneck_dim=32, num_workers=0, log_every=1, save_every=1,
                    warmup_teacher_temp_epochs=1, cnn_self_warmup_teacher_temp_epochs=2)
    settings.update(overrides)
    return resolve_config("tiny", None, settings)


def step_records(output_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("images_per_s", None)
    return [record for record in records if record["kind"] == "step"]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(first: dict, second: dict) -> None:
    for network in checkpointing.NETWORKS:
        assert first[network].keys() == second[network].keys()
        for key in first[network]:
            assert torch.equal(first[network][key], second[network][key]), f"{network}.{key}"
    for name, center in first["centers"].items():
        assert torch.equal(center, second["centers"][name]), name
    for optimizer in ("optimizer1", "optimizer2"):
        for index, state in first[optimizer]["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(second[optimizer]["state"][index][name]))
    assert torch.equal(first["rng"]["torch"], second["rng"]["torch"])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """7 uninterrupted steps, across the epoch boundary at step 5."""
    output = tmp_path_factory.mktemp("reference")
    train(small_config(output, max_steps=7))
    return output


# --- configuration ----------------------------------------------------------------------------------


def test_config_precedence_is_defaults_preset_yaml_flags(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("batch-size: 32\nepochs: 3\nweight_decay_cnn: 2.0e-4\nlosses: [sm, cm]\n")
    config = resolve_config("tiny", yaml_file, {"epochs": 5, "output_dir": str(tmp_path), "seed": None})
    assert config.epochs == 5                      # flag beats YAML
    assert config.batch_size == 32                 # YAML beats preset (64)
    assert config.weight_decay_cnn == 2e-4         # YAML beats default
    assert config.losses == ("sm", "cm")
    assert config.img_size == PRESETS["tiny"]["img_size"] == 32   # preset beats default (224)
    assert config.clip_grad == 3.0                 # untouched default
    assert config.seed == 0                        # None means "not given"
    assert config.preset == "tiny"
    from_yaml_preset = tmp_path / "preset.yaml"
    from_yaml_preset.write_text("preset: r50-r18\n")
    assert resolve_config(None, from_yaml_preset, {"output_dir": "x"}).arch2 == "r18"


def test_default_lambdas_favour_the_larger_backbone(tmp_path):
    def lambdas(preset, **flags):
        config = resolve_config(preset, None, {"output_dir": str(tmp_path), **flags})
        return config.lambda1, config.lambda2

    assert lambdas("r50-vit_s") == (1.0, 0.1)      # R50 (23.5M) > ViT-S (21.7M): the README's choice
    assert lambdas("r50-vit_b") == (0.1, 1.0)
    assert lambdas("vit_s-vit_t") == (1.0, 0.1)
    assert lambdas("r18-r18") == (1.0, 1.0)
    assert lambdas("vit_s-vit_s") == (1.0, 1.0)
    assert lambdas("r50-vit_s", lambda2=0.5) == (1.0, 0.5)
    tiny = resolve_config("tiny", None, {"output_dir": str(tmp_path)})
    assert (tiny.lambda1, tiny.lambda2) == (0.1, 0.1)  # the tiny recipe sets both (README, demo section)
    counts = [sum(p.numel() for p in build_backbone(spec).parameters()) for spec in arch_specs(tiny)]
    assert counts[0] < counts[1]
    assert resolved_lambdas(dataclasses.replace(tiny, lambda1=None, lambda2=None)) == (0.1, 1.0)  # the rule


def test_bad_settings_are_one_line_errors_naming_key_and_file(tmp_path):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("epochs: 3\nbatchsize: 32\n")
    with pytest.raises(MokdError, match=r"bad.yaml.*'batchsize'.*batch_size"):
        resolve_config("tiny", yaml_file, {"output_dir": "x"})
    yaml_file.write_text("batch_size: many\n")
    with pytest.raises(MokdError, match=r"bad.yaml.*'batch_size' must be an integer"):
        resolve_config("tiny", yaml_file, {"output_dir": "x"})
    with pytest.raises(MokdError, match="unknown preset 'r50-vit_x'"):
        resolve_config("r50-vit_x", None, {"output_dir": "x"})
    with pytest.raises(MokdError, match="'losses'"):
        resolve_config("tiny", None, {"output_dir": "x", "losses": "sm,xx"})
    with pytest.raises(MokdError, match="multiple of .*patch size 4"):
        resolve_config("tiny", None, {"output_dir": "x", "local_size": 10})
    with pytest.raises(MokdError, match="'global_scale'") as caught:
        resolve_config("tiny", None, {"output_dir": "x", "global_scale": "0.5,0.2"})
    assert "\n" not in str(caught.value)
    with pytest.raises(MokdError, match="thead_l2norm has no official equivalent"):
        resolve_config("r50-vit_s", None, {"output_dir": "x", "thead_l2norm": True, "export_official": True})
    with pytest.raises(MokdError, match="thead_depth 1 has no official equivalent; set --thead-depth 3"):
        resolve_config("tiny", None, {"output_dir": "x", "thead_l2norm": False, "export_official": True})


# --- a run and its files ----------------------------------------------------------------------------


def test_short_run_writes_checkpoint_config_and_log(tmp_path):
    """The real tiny archs (r_tiny + 12-block vit_t), shrunk to 16 px: 2 steps."""
    config = small_config(tmp_path, arch2="vit_t", max_steps=2)
    summary = train(config)
    assert summary["global_step"] == 2 and summary["epochs_done"] == 0
    checkpoint = load(tmp_path / "checkpoint.pth")  # weights_only
    assert checkpoint["mokd_format"] == 1 and checkpoint["mode"] == "mokd"
    assert (checkpoint["epoch"], checkpoint["step_in_epoch"], checkpoint["global_step"]) == (0, 2, 2)
    assert checkpoint["archs"]["2"]["name"] == "vit_t" and checkpoint["archs"]["2"]["patch_size"] == 4
    assert not any(key.startswith("module.") for key in checkpoint["student1"])
    assert set(checkpoint["centers"]) == {"sm1", "st1", "cm1", "sm2", "st2", "cm2"}
    evaluated = load_backbones(tmp_path / "checkpoint.pth")  # the evaluator reads the native layout strictly
    assert [(backbone.key, backbone.spec.name) for backbone in evaluated] == [("teacher1", "r_tiny"), ("teacher2", "vit_t")]
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(json.dumps(config.to_dict()))
    records = step_records(tmp_path)
    assert [record["step"] for record in records] == [1, 2]
    # Warm-up is linspace(0, peak, warmup iterations): step k has lr peak * (k - 1) / (W - 1).
    peak_cnn = config.lr_cnn * config.batch_size / 256
    peak_vit = config.lr_vit * config.batch_size / 256
    warmup = config.warmup_epochs * STEPS_PER_EPOCH
    assert records[0]["lr"]["1"] == 0.0
    assert records[1]["lr"]["1"] == pytest.approx(peak_cnn / (warmup - 1))
    assert records[1]["lr"]["2"] == pytest.approx(peak_vit / (warmup - 1))
    assert records[1]["lr"]["1_thead"] == pytest.approx(peak_vit / (warmup - 1))  # CNN T-Head: ViT schedule
    # ViT weight decay: cosine from 0.04 to 0.4 over all 10 iterations, no warm-up.
    start, end, iterations = config.weight_decay_vit, config.weight_decay_end_vit, config.epochs * STEPS_PER_EPOCH
    vit_decay = end + 0.5 * (start - end) * (1 + math.cos(math.pi / iterations))
    assert records[1]["weight_decay"] == {"1": config.weight_decay_cnn, "2": pytest.approx(vit_decay)}
    assert all(torch.isfinite(torch.tensor(list(r["losses"].values()))).all() for r in records)
    total = records[1]["losses"]
    assert total["loss1"] == pytest.approx(total["sm1"] + total["st1"] + config.lambda1 * (total["cm1"] + total["ct1"]),
                                           rel=1e-5)


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(tmp_path, reference_run):
    config = small_config(tmp_path, max_steps=3)
    assert train(config)["global_step"] == 3
    # The second half also loads with 2 worker processes: per-sample seeding makes that irrelevant.
    summary = train(small_config(tmp_path, max_steps=7, num_workers=2))
    assert summary["resumed_from"].endswith("checkpoint.pth") and summary["global_step"] == 7
    assert step_records(tmp_path) == step_records(reference_run)
    assert_same_training_state(load(tmp_path / "checkpoint.pth"), load(reference_run / "checkpoint.pth"))
    # Epoch 1 ended at step 5: a numbered copy (save_every 1), identical in both runs.
    assert_same_training_state(load(tmp_path / "checkpoint_0001.pth"), load(reference_run / "checkpoint_0001.pth"))


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, reference_run):
    train(small_config(tmp_path, max_steps=3, checkpoint_every_steps=1))
    latest = tmp_path / "checkpoint.pth"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    summary = train(small_config(tmp_path, max_steps=4, checkpoint_every_steps=1))
    assert summary["resumed_from"].endswith("checkpoint_prev.pth")
    assert (tmp_path / "checkpoint_unreadable.pth").stat().st_size < latest.stat().st_size
    assert load(tmp_path / "checkpoint_prev.pth")["global_step"] == 3  # the rotation kept good files only
    # checkpoint_prev.pth held step 2: steps 3 and 4 were redone, exactly as in the reference run.
    assert step_records(tmp_path) == step_records(reference_run)[:4]


def test_resume_picks_the_most_advanced_readable_checkpoint(tmp_path):
    def fake(name: str, step: int) -> None:
        torch.save({"mokd_format": 1, "global_step": step}, tmp_path / name)

    fake("checkpoint.pth", 30)
    fake("checkpoint_prev.pth", 25)
    fake("checkpoint_0001.pth", 10)
    fake("checkpoint_0002.pth", 20)
    messages = []
    assert checkpointing.find_resume_state(tmp_path, messages.append)[0]["global_step"] == 30
    (tmp_path / "checkpoint.pth").write_bytes(b"PK\x03\x04 truncated")
    state, path = checkpointing.find_resume_state(tmp_path, messages.append)
    assert (state["global_step"], path.name) == (25, "checkpoint_prev.pth")
    assert "checkpoint.pth cannot be read" in messages[-1]
    (tmp_path / "checkpoint_prev.pth").unlink()
    assert checkpointing.find_resume_state(tmp_path, messages.append)[1].name == "checkpoint_0002.pth"
    for path in tmp_path.glob("checkpoint_*.pth"):
        path.write_bytes(b"")
    with pytest.raises(MokdError, match="no readable checkpoint"):
        checkpointing.find_resume_state(tmp_path, messages.append)


def test_resume_refuses_other_archs_or_mode(tmp_path, reference_run):
    with pytest.raises(MokdError, match="holds a mokd run of r_tiny \\+ test_vit.*independent"):
        train(small_config(reference_run, mode="independent", max_steps=8))
    with pytest.raises(MokdError, match="holds a mokd run of r_tiny \\+ test_vit.*vit_t"):
        train(small_config(reference_run, arch2="vit_t", max_steps=8))
    with pytest.raises(MokdError, match="position grids for 16 px, not 32: see position_size"):
        train(small_config(reference_run, position_size=32, max_steps=8))
    with pytest.raises(MokdError, match="trained model 1 with Adam-type but the config builds SGD .see --cnn-optim"):
        train(small_config(reference_run, cnn_optimizer="sgd", max_steps=8))


# --- independence -----------------------------------------------------------------------------------


def test_independent_mode_shares_nothing_between_the_models(tmp_path):
    """Model 1 (r_tiny, no randomness in its forward) trained next to two different partners ends
    bit-identical in independent mode; the MOKD control shows the comparison can see a partner.
    The T-Head width is fixed because by default it follows the partner ViT's width."""
    runs = {}
    for mode in ("independent", "mokd"):
        for partner in ("test_vit", "vit_t"):
            output = tmp_path / f"{mode}-{partner}"
            train(small_config(output, mode=mode, arch2=partner, max_steps=2, losses="sm,cm", thead_dim=64))
            runs[mode, partner] = load(output / "checkpoint.pth")
    alone_a, alone_b = runs["independent", "test_vit"], runs["independent", "vit_t"]
    for network in ("student1", "teacher1"):
        for key, tensor in alone_a[network].items():
            assert torch.equal(tensor, alone_b[network][key]), f"{network}.{key}"
    assert torch.equal(alone_a["centers"]["sm1"], alone_b["centers"]["sm1"])
    assert not torch.equal(alone_a["centers"]["sm2"][:, :5], alone_b["centers"]["sm2"][:, :5])
    together_a, together_b = runs["mokd", "test_vit"], runs["mokd", "vit_t"]
    assert not torch.equal(together_a["student1"]["backbone.conv1.weight"],
                           together_b["student1"]["backbone.conv1.weight"])


# --- official export and --init-from ----------------------------------------------------------------


def test_export_official_layout_and_init_from_reproduce_every_tensor(tmp_path):
    config = small_config(tmp_path / "run", arch1="r18", arch2="vit_t", patch_size=16, img_size=64, local_size=32,
                          batch_size=16, epochs=1, warmup_epochs=0, export_official=True, losses="sm,st,cm,ct",
                          thead_l2norm=False, thead_depth=3)
    train(config)
    official_dir = tmp_path / "run" / "official"
    assert sorted(path.name for path in official_dir.iterdir()) == [
        "mokd_resnet18.vit_tiny_pretrain_mokd_0000.pth", "mokd_resnet18.vit_tiny_pretrain_mokd_temp.pth"]
    exported = load(official_dir / "mokd_resnet18.vit_tiny_pretrain_mokd_temp.pth")
    native = load(tmp_path / "run" / "checkpoint.pth")
    assert (exported["arch_cnn"], exported["arch_vit"], exported["epoch"]) == ("resnet18", "vit_tiny", 1)
    for key, native_key in (("student_cnn", "student1"), ("teacher_cnn", "teacher1"), ("student_vit", "student2")):
        assert exported[key].keys() == {f"module.{name}" for name in native[native_key]}
    assert exported["teacher_vit"].keys() == native["teacher2"].keys()
    assert "transhead.patch_embed.weight" in native["teacher1"]       # the CNN's 1x1 projection
    assert "transhead.patch_embed.weight" not in native["teacher2"]
    loss_keys = {f"loss_{family}{kind}_fn" for family in ("cnn", "vit") for kind in ("", "_thead", "_ct")}
    assert loss_keys <= exported.keys()
    assert torch.equal(exported["loss_vit_ct_fn"]["center"], native["centers"]["cm2"])
    assert torch.equal(exported["loss_cnn_thead_fn"]["center"], native["centers"]["st1"])

    loaded = load_backbones(official_dir / "mokd_resnet18.vit_tiny_pretrain_mokd_temp.pth")
    assert [backbone.key for backbone in loaded] == ["teacher_cnn", "teacher_vit"]
    for backbone, network in zip(loaded, ("teacher1", "teacher2")):
        expected = {key.removeprefix("backbone."): value for key, value in native[network].items()
                    if key.startswith("backbone.")}
        for key, value in backbone.module.state_dict().items():
            assert torch.equal(value, expected[key])

    for source in (official_dir / "mokd_resnet18.vit_tiny_pretrain_mokd_temp.pth", tmp_path / "run" / "checkpoint.pth"):
        torch.manual_seed(123)
        pair = MokdPair(*arch_specs(config), pair_config(config))
        messages = []
        checkpointing.initialise_from(checkpointing.read_init_source(source, pair.specs), pair, messages.append)
        assert messages[0].startswith(f"loaded {len(native['student1'])} tensors into student1 (r18)")
        modules = (pair.students[0], pair.teachers[0], pair.students[1], pair.teachers[1])
        for module, network in zip(modules, checkpointing.NETWORKS):
            state = module.state_dict()
            assert state.keys() == native[network].keys()
            assert all(torch.equal(state[key], native[network][key]) for key in state)
        assert all(torch.equal(pair.centers_state_dict()[name], c) for name, c in native["centers"].items())


def test_export_and_init_from_refuse_what_the_layout_cannot_hold(tmp_path, reference_run):
    with pytest.raises(MokdError, match="CNN-ViT pair"):
        checkpointing.official_stem(arch_specs(small_config(tmp_path, arch2="r_tiny")))
    with pytest.raises(MokdError, match="r_tiny .*no official MOKD architecture name"):
        checkpointing.official_stem(arch_specs(small_config(tmp_path)))
    config = small_config(tmp_path, arch2="vit_t")
    pair = MokdPair(*arch_specs(config), pair_config(config))
    with pytest.raises(MokdError, match=r"student1 does not match.*wrong shape"):
        checkpointing.initialise_from(checkpointing.read_init_source(reference_run / "checkpoint.pth", pair.specs),
                                      pair, print)


# --- divergence ---------------------------------------------------------------------------------------


def test_non_finite_loss_stops_naming_the_term_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real_search_loss = losses.search_loss
    calls = []

    def search_loss_failing_in_step_2(*args, **kwargs):
        calls.append(1)
        value = real_search_loss(*args, **kwargs)
        return value * float("nan") if len(calls) == 3 else value  # ct1 of step 2

    monkeypatch.setattr(losses, "search_loss", search_loss_failing_in_step_2)
    with pytest.raises(MokdError, match=r"loss term ct1 became non-finite at step 2 \(epoch 1\).*untouched"):
        train(small_config(tmp_path, max_steps=4, checkpoint_every_steps=1))
    assert load(tmp_path / "checkpoint.pth")["global_step"] == 1
    assert not (tmp_path / "checkpoint_prev.pth").exists()
    assert [record["step"] for record in step_records(tmp_path)] == [1]


def test_augmentation_probabilities_reach_the_multicrop_recipe(tmp_path):
    from mokd.core.data import parse_data_spec
    from mokd_train.data import multicrop_config

    config = small_config(tmp_path, solarize_p=0.3, local_blur_p=0.3)
    crops = multicrop_config(config, parse_data_spec("shapes:50"))
    assert (crops.solarize_p, crops.local_blur_p, crops.flip_p) == (0.3, 0.3, 0.0)  # flip: the tiny preset's 0
    assert crops.jitter_p == 0.8 and crops.global_size == 16  # unset probabilities keep the recipe's value
    with pytest.raises(MokdError, match="'solarize_p' is a probability"):
        small_config(tmp_path, solarize_p=1.5)


def test_init_from_an_official_checkpoint_with_a_224px_grid_at_another_crop_size(tmp_path, capsys):
    """The official code keeps the ViT (and T-Head) grids of 224 px whatever the crop size: such a file is taken
    at 64 px crops with every tensor as stored (14x14 / 7x7 grids, resized at every forward), position_size = 224
    is recorded, and a resume without --init-from rebuilds the same shapes."""
    settings = dict(arch1="r18", arch2="vit_t", patch_size=16, out_dim=32, mlp_hidden_dim=16,
                    mlp_bottleneck_dim=8)
    stored_config = small_config(tmp_path / "a", img_size=224, local_size=96, **settings)
    torch.manual_seed(0)
    stored = MokdPair(*arch_specs(stored_config), pair_config(stored_config))
    native = {"epoch": 0, "centers": stored.centers_state_dict(), "optimizer1": {}, "optimizer2": {},
              "scaler1": None, "scaler2": None}
    for index in (0, 1):
        native[f"student{index + 1}"] = stored.students[index].state_dict()
        native[f"teacher{index + 1}"] = stored.teachers[index].state_dict()
    path = tmp_path / "official.pth"
    torch.save(checkpointing.official_state(native, stored.specs), path)
    assert native["student2"]["backbone.pos_embed"].shape == (1, 1 + 14 * 14, 192)
    assert native["student1"]["transhead.pos_embed"].shape == (1, 7 * 7, 192)

    run = tmp_path / "b"
    config = small_config(run, img_size=64, local_size=32, init_from=str(path), **settings)
    assert config.position_size is None
    initial = load(save_initial_checkpoint(config))
    assert f"position_size = 224: the position grids stored in {path} are built for 224 px" in capsys.readouterr().out
    assert initial["config"]["position_size"] == 224
    assert [initial["archs"][key]["img_size"] for key in ("1", "2")] == [224, 224]
    for network in checkpointing.NETWORKS:
        assert initial[network].keys() == native[network].keys()
        for key, value in initial[network].items():
            assert torch.equal(value, native[network][key]), f"{network}.{key}"

    summary = train(dataclasses.replace(config, init_from=None, max_steps=1, warmup_epochs=0))  # resumes it
    assert summary["resumed_from"] == str(run / "checkpoint.pth") and summary["global_step"] == 1
    assert json.loads((run / "config.json").read_text())["position_size"] == 224
    trained = load(run / "checkpoint.pth")
    assert trained["student2"]["backbone.pos_embed"].shape == (1, 1 + 14 * 14, 192)
    assert not torch.equal(trained["student2"]["transhead.pos_embed"], native["student2"]["transhead.pos_embed"])

    with pytest.raises(MokdError, match=r"student1 does not match.*transhead.pos_embed.*leave position_size unset"):
        save_initial_checkpoint(dataclasses.replace(config, output_dir=str(tmp_path / "c"), position_size=64))


def test_stored_position_size_reads_the_grids_and_refuses_mixed_ones(tmp_path):
    specs = arch_specs(small_config(tmp_path, arch1="r18", arch2="vit_t", patch_size=16, img_size=64, local_size=32))

    def source(vit_side: int, cnn_side: int) -> checkpointing.InitSource:
        networks = {}
        for name in checkpointing.NETWORKS:
            grid = {"transhead.pos_embed": torch.zeros(1, (vit_side if name.endswith("2") else cnn_side) ** 2, 4)}
            if name.endswith("2"):
                grid["backbone.pos_embed"] = torch.zeros(1, 1 + vit_side ** 2, 4)
            networks[name] = grid
        return checkpointing.InitSource(tmp_path / "x.pth", networks, {})

    assert checkpointing.stored_position_size(source(14, 7), specs) == 224
    assert checkpointing.stored_position_size(source(6, 3), specs) == 96
    with pytest.raises(MokdError, match=r"student1.transhead.pos_embed 4x4.*do not all come from one image size"):
        checkpointing.stored_position_size(source(14, 4), specs)


def test_lr_floors_are_scaled_by_batch_like_the_peaks(tmp_path):
    from mokd_train.optim import build_schedules

    config = small_config(tmp_path, batch_size=32, epochs=2, warmup_epochs=1, lr_cnn=0.1, min_lr_cnn=0.0048,
                          lr_vit=3e-4, min_lr_vit=1e-5)
    schedules = build_schedules(config, steps_per_epoch=10)
    scale = 32 / 256
    assert schedules.lr["resnet"].max() == pytest.approx(0.1 * scale)
    assert schedules.lr["resnet"][-1] == pytest.approx(0.0048 * scale + 0.5 * (0.1 - 0.0048) * scale
                                                        * (1 + math.cos(math.pi * 9 / 10)))
    assert schedules.lr["vit"][10] == pytest.approx(3e-4 * scale)  # first step after warm-up
    assert schedules.lr["vit"].min() >= 0.0 and schedules.lr["vit"][10:].min() >= 1e-5 * scale


def test_paper_presets_keep_dino_schedules_and_tiny_sizes_them_to_its_steps(tmp_path):
    """Paper presets: 10 warm-up epochs and an EMA cosine from 0.996 to 1 (DINO). The tiny recipe: a warm-up of half
    an epoch (22 of 44 steps) and a constant EMA momentum, against closed forms."""
    from mokd_train.optim import build_schedules

    paper = resolve_config("r50-vit_s", None, {"output_dir": str(tmp_path)})
    assert (paper.warmup_epochs, paper.momentum_teacher, paper.momentum_teacher_end) == (10, 0.996, 1.0)
    schedules = build_schedules(paper, steps_per_epoch=3)
    iterations = np.arange(300)
    assert schedules.momentum == pytest.approx(1.0 - 0.5 * 0.004 * (1 + np.cos(np.pi * iterations / 300)))
    assert schedules.lr["vit"][:30] == pytest.approx(np.linspace(0.0, 3e-4, 30))

    tiny = resolve_config("tiny", None, {"output_dir": str(tmp_path)})
    schedules = build_schedules(tiny, steps_per_epoch=44)
    peak = tiny.lr_vit * tiny.batch_size / 256
    assert schedules.lr["vit"][:22] == pytest.approx(np.linspace(0.0, peak, 22))
    assert schedules.lr["vit"][22] == pytest.approx(peak) and schedules.lr["vit"][23] < peak
    assert np.all(schedules.momentum == tiny.momentum_teacher)
    rising = build_schedules(dataclasses.replace(tiny, momentum_teacher=0.98), steps_per_epoch=44).momentum
    steps = np.arange(len(rising))
    assert rising == pytest.approx(0.99 + 0.5 * (0.98 - 0.99) * (1 + np.cos(np.pi * steps / len(rising))))
    with pytest.raises(MokdError, match="momentum_teacher_end"):
        resolve_config("tiny", None, {"output_dir": str(tmp_path), "momentum_teacher_end": 1.5})


def test_cnn_optimizer_is_sgd_in_paper_presets_and_adamw_when_chosen(tmp_path):
    """The official recipe trains a ResNet with SGD (momentum 0.9); `cnn_optimizer: adamw` (the tiny recipe) gives
    it AdamW like the ViT, T-Head group included; anything else is a one-line error."""
    from mokd_train.optim import build_optimizer

    def optimizers(config: TrainConfig) -> list[torch.optim.Optimizer]:
        pair = MokdPair(*arch_specs(config), pair_config(config))
        return [build_optimizer(pair, index, cnn_optimizer=config.cnn_optimizer) for index in (0, 1)]

    paper = small_config(tmp_path, cnn_optimizer="sgd")
    assert resolve_config("r50-vit_s", None, {"output_dir": str(tmp_path)}).cnn_optimizer == "sgd"
    cnn, vit = optimizers(paper)
    assert type(cnn) is torch.optim.SGD and cnn.defaults["momentum"] == 0.9 and type(vit) is torch.optim.AdamW
    tiny = small_config(tmp_path)
    assert tiny.cnn_optimizer == "adamw"
    cnn, vit = optimizers(tiny)
    assert type(cnn) is torch.optim.AdamW and type(vit) is torch.optim.AdamW
    assert len(cnn.param_groups) == len(optimizers(paper)[0].param_groups)  # same groups (T-Head's own lr kept)
    with pytest.raises(MokdError, match="'cnn_optimizer' must be one of sgd, adamw, got 'lars'"):
        small_config(tmp_path, cnn_optimizer="lars")


def test_tuple_settings_parse_on_the_command_line(tmp_path, monkeypatch):
    import mokd.cli as cli
    from click.testing import CliRunner

    captured = {}
    monkeypatch.setattr("mokd_train.engine.train", lambda config: captured.setdefault("config", config) and {
        "rank": 0, "checkpoint": None, "replaced_images": 0})
    result = CliRunner().invoke(cli.mokd_train, ["--preset", "tiny", "--output-dir", str(tmp_path),
                                                 "--global-scale", "0.4,1.0", "--local-scale", "0.05,0.4",
                                                 "--losses", "sm,cm"])
    assert result.exit_code == 0, result.output
    config = captured["config"]
    assert config.global_scale == (0.4, 1.0) and config.local_scale == (0.05, 0.4) and config.losses == ("sm", "cm")


# --- hardening: divergence, crashes mid-save, resume messages ------------------------------------------


def test_weights_turning_non_finite_before_any_loss_are_never_saved(tmp_path, monkeypatch, capsys):
    real_update = MokdPair.update_teachers
    calls = []

    def poisoning_update(self, momentum):
        calls.append(1)
        if len(calls) == 2:  # step 2: the optimizer blew student1 up; the losses of step 2 were still finite
            with torch.no_grad():
                next(self.students[0].parameters()).fill_(float("inf"))
        return real_update(self, momentum)

    monkeypatch.setattr(MokdPair, "update_teachers", poisoning_update)
    with pytest.raises(MokdError, match=r"weights of student1, teacher1.* non-finite at step 2 .*before any loss did"
                                        r".*last good checkpoint .*checkpoint.pth was left untouched") as caught:
        train(small_config(tmp_path, max_steps=4, checkpoint_every_steps=1))
    named = Path(str(caught.value).split("last good checkpoint ")[1].split(" was left")[0])
    assert load(named)["global_step"] == 1 and not checkpointing.non_finite_networks(load(named))
    monkeypatch.undo()
    summary = train(small_config(tmp_path, max_steps=2, checkpoint_every_steps=1))  # the named file resumes
    assert summary["resumed_from"] == str(named) and summary["global_step"] == 2


def test_a_poisoned_checkpoint_is_skipped_on_resume(tmp_path):
    train(small_config(tmp_path, max_steps=2, checkpoint_every_steps=1))
    latest = tmp_path / "checkpoint.pth"
    state = load(latest)
    next(iter(state["student2"].values())).view(-1)[0] = float("nan")
    torch.save(state, latest)
    summary = train(small_config(tmp_path, max_steps=3, checkpoint_every_steps=1))
    assert summary["resumed_from"].endswith("checkpoint_prev.pth")


def test_stale_temporaries_are_removed_and_the_owed_numbered_copy_written(tmp_path, capsys):
    train(small_config(tmp_path, max_steps=STEPS_PER_EPOCH))  # ends epoch 1
    numbered = tmp_path / "checkpoint_0001.pth"
    reference = load(numbered)
    numbered.unlink()  # as if kill -9 struck between checkpoint.pth and its numbered copy
    orphans = [tmp_path / ".checkpoint_0001.pth.x1y2z3.tmp", tmp_path / "official" / ".mokd_a.pth.q1w2.tmp"]
    for orphan in orphans:
        orphan.parent.mkdir(exist_ok=True)
        orphan.write_bytes(b"half a checkpoint")
    capsys.readouterr()
    train(small_config(tmp_path, max_steps=STEPS_PER_EPOCH + 1))
    assert not any(orphan.exists() for orphan in orphans)
    assert_same_training_state(load(numbered), reference)
    output = capsys.readouterr().out
    assert "removed 2 temporary file(s)" in output and "wrote checkpoint_0001.pth" in output


def test_resume_with_nothing_to_resume_says_so(tmp_path, capsys):
    train(small_config(tmp_path / "fresh", max_steps=1))
    assert f"nothing to resume in {tmp_path / 'fresh'}" in capsys.readouterr().out
