"""The one fine-tuning engine: learning, exact resume, gradient accumulation, logs, settings checks."""

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

from mokd.core.data import eval_transform, open_dataset, parse_data_spec, train_transform
from mokd.core.distributed import setup
from mokd.core.errors import MokdError
from mokd.core.features import FeatureKind
from mokd_eval.finetune import Classifier, FitSettings, clamp_batch, evaluate, fit
from mokd_eval.protocols import Preset, TrainOptions, resolve_settings
from mokd.core.registry import ALIASES, build_backbone

pytestmark = pytest.mark.slow  # trains

CNN = ALIASES["r_tiny"]
CONTEXT = setup("cpu")


def shapes(split: str, augmented: bool = False, size: int = 200):
    spec = parse_data_spec(f"shapes:{size}")
    transform = train_transform(spec)[0] if augmented else eval_transform(spec)[0]
    return open_dataset(spec, split, transform)


def model(frozen: bool, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(build_backbone(CNN), CNN, FeatureKind(), 10, frozen=frozen)


def settings(**overrides) -> FitSettings:
    values = dict(epochs=2, batch_size=32, lr=0.5, warmup_epochs=0, num_workers=0, seed=0)
    values.update(overrides)
    return FitSettings(**values)


def test_finetuning_improves_over_the_initial_model_on_shapes(tmp_path: Path):
    spec = parse_data_spec("shapes:1000")
    train = Subset(open_dataset(spec, "train", train_transform(spec, crop="padded")[0]), range(480))
    val = open_dataset(spec, "val", eval_transform(spec)[0])
    network = model(frozen=False)
    before = evaluate(network, val, batch_size=100, num_workers=0, context=CONTEXT)
    result = fit(network, train, settings(epochs=3, lr=1.0), run_dir=tmp_path, context=CONTEXT)
    after = evaluate(network, val, batch_size=100, num_workers=0, context=CONTEXT)
    assert result.history[-1]["loss"] < result.history[0]["loss"] - 0.2
    assert after["top1"] > before["top1"] + 8, (before, after)  # 200 val images, 10 classes
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [1, 2, 3] and all(entry["images_per_s"] > 0 for entry in log)


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path: Path):
    train = shapes("train", augmented=True, size=100)
    full = model(frozen=False)
    fit(full, train, settings(epochs=2, warmup_epochs=1), run_dir=tmp_path / "a", context=CONTEXT)

    def interrupt(epoch: int) -> None:
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(model(frozen=False), train, settings(epochs=2, warmup_epochs=1), run_dir=tmp_path / "b", context=CONTEXT,
            resume=True, on_epoch_end=interrupt)
    resumed = model(frozen=False, seed=123)  # other initial weights: everything must come from the checkpoint
    torch.manual_seed(999)  # and other RNG state
    result = fit(resumed, train, settings(epochs=2, warmup_epochs=1), run_dir=tmp_path / "b", context=CONTEXT,
                 resume=True)
    assert result.resumed_from_epoch == 1
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert (tmp_path / "a" / "log.jsonl").read_text().count("\n") == 2
    assert [r["loss"] for r in json.loads(json.dumps(result.history))] == pytest.approx(
        [json.loads(line)["loss"] for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()], abs=0)


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path: Path):
    train = Subset(shapes("train", size=100), range(48))  # no augmentation: the same images in both runs
    one = model(frozen=True)
    fit(one, train, settings(epochs=1, batch_size=16), run_dir=tmp_path / "one", context=CONTEXT)
    accumulated = model(frozen=True)
    result = fit(accumulated, train, settings(epochs=1, batch_size=16, max_batch_per_step=5),
                 run_dir=tmp_path / "acc", context=CONTEXT)
    assert (result.accum_steps, result.micro_batch) == (4, 4)
    torch.testing.assert_close(one.head.weight, accumulated.head.weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(one.head.bias, accumulated.head.bias, rtol=1e-5, atol=1e-7)


def test_resume_refuses_another_class_count_or_other_settings(tmp_path: Path):
    train = Subset(shapes("train", size=100), range(16))
    fit(model(frozen=True), train, settings(epochs=1, batch_size=16), run_dir=tmp_path, context=CONTEXT,
        signature={"num_classes": 10})
    with pytest.raises(MokdError, match="trained for 10 classes but the dataset has 7"):
        fit(model(frozen=True), train, settings(epochs=1, batch_size=16), run_dir=tmp_path, context=CONTEXT,
            resume=True, signature={"num_classes": 7})
    with pytest.raises(MokdError, match="other settings.*epochs"):
        fit(model(frozen=True), train, settings(epochs=3, batch_size=16), run_dir=tmp_path, context=CONTEXT,
            resume=True, signature={"num_classes": 10})


def test_frozen_classifier_trains_only_the_head(tmp_path: Path):
    network = model(frozen=True)
    backbone_before = {k: v.clone() for k, v in network.backbone.state_dict().items()}
    head_before = network.head.weight.detach().clone()
    fit(network, shapes("train", augmented=True, size=100), settings(epochs=1), run_dir=tmp_path, context=CONTEXT)
    assert all(torch.equal(backbone_before[k], v) for k, v in network.backbone.state_dict().items())
    assert not torch.equal(head_before, network.head.weight)
    assert network.head.weight.std().item() > 0 and abs(head_before.std().item() - 0.01) < 0.002  # N(0, 0.01) init


def test_batch_clamp_and_warmup_scaling():
    assert clamp_batch(64, 100, "x") == (64, [])
    batch, warnings = clamp_batch(2048, 100, "training")
    assert batch == 100 and "larger than the 100 training images" in warnings[0]
    with pytest.raises(MokdError):
        clamp_batch(0, 100, "x")
    preset = Preset(epochs=100, batch_size=2048, warmup_epochs=10, lr=0.08)
    resolved, _ = resolve_settings(preset, TrainOptions(epochs=20), 5000)
    assert (resolved.epochs, resolved.warmup_epochs, resolved.batch_size) == (20, 2, 2048)
    assert resolved.scaled_lr() == pytest.approx(0.08 * 8)
    with pytest.raises(MokdError, match="does not fit"):
        resolve_settings(preset, TrainOptions(epochs=5, warmup_epochs=6), 5000)


def _ddp_rank(rank: int, port: int, run_dir: Path) -> None:
    import os

    from mokd.core.distributed import teardown

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    context = setup("cpu")
    try:
        fit(model(frozen=True), Subset(shapes("train", size=100), range(48)), settings(epochs=2, batch_size=16),
            run_dir=run_dir, context=context)
    finally:
        teardown(context)


@pytest.mark.slow
def test_two_gloo_processes_train_what_one_process_does(tmp_path: Path):
    """Each rank takes every other index of the same seeded permutation, so a step sees the same 16 images."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_rank, args=(port, tmp_path / "ddp"), nprocs=2, join=True)
    single = model(frozen=True)
    fit(single, Subset(shapes("train", size=100), range(48)), settings(epochs=2, batch_size=16),
        run_dir=tmp_path / "one", context=CONTEXT)
    ddp = torch.load(tmp_path / "ddp" / "checkpoint.pth", weights_only=True)
    torch.testing.assert_close(ddp["model"]["weight"], single.head.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp["model"]["bias"], single.head.bias.detach(), rtol=1e-5, atol=1e-6)
    assert ddp["history"][0]["loss"] == pytest.approx(
        json.loads((tmp_path / "one" / "log.jsonl").read_text().splitlines()[0])["loss"], rel=1e-5)
