"""Two gloo processes on CPU train exactly what one process does with the same global batch.

Equal by construction: each rank reads every other sample of the same seeded permutation with
per-sample seeded crops, DDP averages the two half-batch gradients (the loss is a per-sample mean),
batch norms share statistics across ranks, and the centers are all-reduced. Drop-path is off: its
masks are drawn per rank and could not match a single process's draws.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mokd_train.config import TrainConfig, resolve_config
from mokd.core.errors import MokdError
from mokd.core.distributed import AllReduceBatchNorm1d, AllReduceBatchNorm2d
from mokd_train.engine import train

pytestmark = pytest.mark.slow  # spawns DDP processes

WORLD_SIZE = 2
# float32 sums in a different order (two half batches then an all-reduce, 1 vs 2 threads per matmul)
# differ by ~3e-7 relative in the losses; AdamW divides by sqrt(v), which lifts that to ~1e-6 absolute
# in a few weights after 3 steps (measured: 1.2e-6 at worst). 1e-5 sits above that noise and far below
# a real divergence (measured: without synchronised batch norms a running variance differs by 0.48).
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_rank(rank: int, port: int, config: TrainConfig) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(config)


def ddp_config(output_dir: Path) -> TrainConfig:
    return resolve_config("tiny", None, dict(
        output_dir=str(output_dir), data="shapes:50", arch2="test_vit", img_size=16, local_size=8, n_local=2,
        batch_size=8, epochs=2, warmup_epochs=0, out_dim=128, mlp_hidden_dim=64, mlp_bottleneck_dim=32,
        num_workers=0, log_every=1, max_steps=3, drop_path=0.0, freeze_last_layer=0,
        warmup_teacher_temp_epochs=1, cnn_self_warmup_teacher_temp_epochs=2,
        # AdamW (both nets in the tiny recipe) turns rounding noise in near-zero gradients into steps of up to lr:
        # at the recipe's lr (1.6e-2 per 256 = 5e-4 at batch 8) 3 steps differ by 1.7e-4 between 1 and 2
        # processes; at 5e-4 per 256 they stay within the 1e-5 tolerance.
        lr_vit=5e-4, lr_cnn=5e-4))


def step_losses(output_dir: Path) -> list[dict[str, float]]:
    lines = (output_dir / "log.jsonl").read_text().splitlines()
    return [record["losses"] for record in map(json.loads, lines) if record["kind"] == "step"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(run_rank, args=(free_port(), ddp_config(tmp_path / "ddp")), nprocs=WORLD_SIZE, join=True)
    train(ddp_config(tmp_path / "single"))

    ddp_losses, single_losses = step_losses(tmp_path / "ddp"), step_losses(tmp_path / "single")
    assert len(ddp_losses) == len(single_losses) == 3
    for ddp_step, single_step in zip(ddp_losses, single_losses):
        assert ddp_step.keys() == single_step.keys()
        for term, value in single_step.items():
            assert ddp_step[term] == pytest.approx(value, rel=TOLERANCE, abs=TOLERANCE), term

    ddp = torch.load(tmp_path / "ddp" / "checkpoint.pth", weights_only=True)
    single = torch.load(tmp_path / "single" / "checkpoint.pth", weights_only=True)
    assert ddp["global_step"] == single["global_step"] == 3
    compared = 0
    for network in ("student1", "teacher1", "student2", "teacher2"):
        assert ddp[network].keys() == single[network].keys()
        for key, value in single[network].items():
            if value.is_floating_point():
                torch.testing.assert_close(ddp[network][key], value, rtol=TOLERANCE, atol=TOLERANCE,
                                           msg=f"{network}.{key}")
            else:
                assert torch.equal(ddp[network][key], value), f"{network}.{key}"
            compared += 1
    # BN running statistics prove the batch norms saw the whole global batch on both ranks.
    assert "backbone.bn1.running_var" in single["student1"] and compared > 200
    for name, center in single["centers"].items():
        torch.testing.assert_close(ddp["centers"][name], center, rtol=TOLERANCE, atol=TOLERANCE)


def _batchnorm_rank(rank: int, port: int, inputs: torch.Tensor, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    layer = torch.nn.BatchNorm2d(3) if inputs.dim() == 4 else torch.nn.BatchNorm1d(3)
    layer.__class__ = AllReduceBatchNorm2d if inputs.dim() == 4 else AllReduceBatchNorm1d
    half = inputs.chunk(WORLD_SIZE)[rank].clone().requires_grad_(True)
    output = layer(half)
    (output * _channel_weights(inputs)).square().sum().backward()
    results[rank] = (output.detach(), half.grad, layer.weight.grad, layer.running_var.clone())
    torch.distributed.destroy_process_group()


def _channel_weights(inputs: torch.Tensor) -> torch.Tensor:
    return torch.arange(1.0, 4.0).view(1, 3, *[1] * (inputs.dim() - 2))


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(6, 3, 4, 4), (6, 3)], ids=["2d-cnn", "1d-mlp-head"])
def test_all_reduce_batchnorm_matches_batchnorm_on_the_whole_batch(shape):
    """Outputs, input gradients, summed weight gradients and running variance equal plain BatchNorm's."""
    torch.manual_seed(0)
    inputs = torch.randn(*shape) * 3 + 1
    results = mp.Manager().dict()
    mp.spawn(_batchnorm_rank, args=(free_port(), inputs, results), nprocs=WORLD_SIZE, join=True)

    reference = torch.nn.BatchNorm2d(3) if len(shape) == 4 else torch.nn.BatchNorm1d(3)
    whole = inputs.clone().requires_grad_(True)
    output = reference(whole)
    (output * _channel_weights(inputs)).square().sum().backward()
    torch.testing.assert_close(torch.cat([results[r][0] for r in range(WORLD_SIZE)]), output.detach())
    torch.testing.assert_close(torch.cat([results[r][1] for r in range(WORLD_SIZE)]), whole.grad)
    torch.testing.assert_close(results[0][2] + results[1][2], reference.weight.grad)
    torch.testing.assert_close(results[0][3], reference.running_var)


def _diverging_rank(rank: int, port: int, config: TrainConfig, messages: dict) -> None:
    """Rank 1 alone gets a NaN search loss in step 2; both ranks must stop there with one message."""
    from mokd_train import losses

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if rank == 1:
        real, calls = losses.search_loss, []

        def nan_in_step_2(*args, **kwargs):
            calls.append(1)
            value = real(*args, **kwargs)
            return value * float("nan") if len(calls) > 2 else value  # two ct terms per step

        losses.search_loss = nan_in_step_2
    try:
        train(config)
        messages[rank] = "finished"
    except MokdError as error:
        messages[rank] = str(error)


@pytest.mark.slow
def test_non_finite_loss_on_one_rank_stops_every_rank_in_the_same_step(tmp_path):
    messages = mp.Manager().dict()
    config = dataclasses.replace(ddp_config(tmp_path), max_steps=4)
    mp.spawn(_diverging_rank, args=(free_port(), config, messages), nprocs=WORLD_SIZE, join=True)
    assert messages[0] == messages[1]
    assert messages[0].startswith("loss term ct1 became non-finite at step 2 (epoch 1)")
