"""DoGo and MCL under 2 gloo processes train exactly what one process does with the same global batch.

DoGo's NT-Xent and relation KL depend on the whole batch (embeddings are gathered with gradient); MCL's
queues receive the keys of the whole batch in one-process order. Drop-path is off (its masks are per rank).

DoGo runs two ResNets here: with a ViT, parameters whose true gradient is exactly zero (the final LayerNorm
bias and the key biases, whose effect the projection head's batch norm or the softmax removes) receive
float-noise gradients that Adam normalises into lr-sized steps of random sign (measured: 7e-4 apart after
3 steps, while every other weight agrees to 3e-6). That is Adam on a null gradient, not a DDP difference. Even with ResNets Adam lifts float-order noise in
the last projection weights (normalised output, so one direction of their gradient is null) to 1.3e-5
(measured; every other tensor within 3e-6): DoGo's weights are compared at 5e-5, still far below the
3e-4-per-step moves a wrong gradient would cause under Adam.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mokd_train.config import TrainConfig, resolve_config
from mokd_train.engine import train
from mokd_train.methods.base import gather_with_grad
from tests.train.test_train_ddp import TOLERANCE, WORLD_SIZE, free_port

pytestmark = pytest.mark.slow  # spawns DDP processes

METHODS = ("dogo", "mcl")
WEIGHT_TOLERANCE = {"dogo": 5e-5, "mcl": TOLERANCE}


def peer_config(output_dir: Path, method: str) -> TrainConfig:
    return resolve_config("tiny", None, dict(
        method=method, output_dir=str(output_dir), data="shapes:50", arch2="r_tiny" if method == "dogo" else "test_vit",
        img_size=16, batch_size=8,
        epochs=2, max_steps=3, num_workers=0, log_every=1, drop_path=0.0,
        **({"queue_size": 16} if method == "mcl" else {})))


def run_rank(rank: int, port: int, root: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    for method in METHODS:
        train(peer_config(root / "ddp" / method, method))


def step_losses(output_dir: Path) -> list[dict[str, float]]:
    records = map(json.loads, (output_dir / "log.jsonl").read_text().splitlines())
    return [record["losses"] for record in records if record["kind"] == "step"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_for_dogo_and_mcl(tmp_path):
    mp.spawn(run_rank, args=(free_port(), tmp_path), nprocs=WORLD_SIZE, join=True)
    for method in METHODS:
        train(peer_config(tmp_path / "single" / method, method))
        ddp_losses = step_losses(tmp_path / "ddp" / method)
        single_losses = step_losses(tmp_path / "single" / method)
        assert len(ddp_losses) == len(single_losses) == 3
        for ddp_step, single_step in zip(ddp_losses, single_losses):
            assert ddp_step.keys() == single_step.keys()
            for term, value in single_step.items():
                assert ddp_step[term] == pytest.approx(value, rel=TOLERANCE, abs=TOLERANCE), (method, term)
        ddp = torch.load(tmp_path / "ddp" / method / "checkpoint.pth", weights_only=True)
        single = torch.load(tmp_path / "single" / method / "checkpoint.pth", weights_only=True)
        networks = ("student1", "student2") + (("teacher1", "teacher2") if method == "mcl" else ())
        for network in networks:
            assert ddp[network].keys() == single[network].keys()
            for key, value in single[network].items():
                tolerance = WEIGHT_TOLERANCE[method]
                torch.testing.assert_close(ddp[network][key].double(), value.double(), rtol=tolerance,
                                           atol=tolerance, msg=f"{method} {network}.{key}")
        if method == "dogo":  # the projection head's batch norm saw the whole batch on both ranks
            assert "head.bn.running_var" in single["student1"]
        for name, value in single["method_state"].items():  # MCL's queues, in the same order
            torch.testing.assert_close(ddp["method_state"][name], value, rtol=TOLERANCE, atol=TOLERANCE)


def _gather_rank(rank: int, port: int, rows: torch.Tensor, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    mine = rows[rank::WORLD_SIZE].clone().requires_grad_(True)  # EpochShardSampler's interleaved share
    gathered = gather_with_grad(mine)
    (gathered.square().sum(dim=1) * torch.arange(1.0, 1.0 + len(rows))).sum().backward()
    results[rank] = (gathered.detach(), mine.grad)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_gather_with_grad_restores_the_global_order_and_sends_w_times_the_gradient():
    """Every rank computes the same global loss; each row's gradient arrives W times (DDP's mean divides it)."""
    rows = torch.randn(6, 3)
    results = mp.Manager().dict()
    mp.spawn(_gather_rank, args=(free_port(), rows, results), nprocs=WORLD_SIZE, join=True)
    weights = torch.arange(1.0, 7.0)[:, None]
    for rank in range(WORLD_SIZE):
        torch.testing.assert_close(results[rank][0], rows)
        torch.testing.assert_close(results[rank][1], WORLD_SIZE * 2 * (weights * rows)[rank::WORLD_SIZE])
