"""The training-loop pieces the three loops share: precision, one update, RNG state, optimizer/scaler resume."""

import random
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from mokd.core.errors import MokdError
from mokd.core.training_loop import (amp_dtype, autocast_context, autocast_for, capture_rng, make_scaler,
                                     optimizer_step, precision_dtype, restore_optimization, restore_rng,
                                     scale_loss, scaler_state)

CPU = torch.device("cpu")


def test_precision_and_amp_settings_give_their_autocast_dtype():
    assert precision_dtype(CPU, "fp32") is None
    assert precision_dtype(torch.device("cuda", 0), "bf16") == torch.bfloat16
    with pytest.raises(MokdError, match="--precision fp16 needs a CUDA device"):
        precision_dtype(CPU, "fp16")
    with pytest.raises(MokdError, match="--precision"):
        precision_dtype(CPU, "fp8")
    assert amp_dtype("auto", CPU) is None and amp_dtype("none", CPU) is None
    assert amp_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert amp_dtype("bf16", CPU) == torch.bfloat16  # the trainer allows bf16 on a CPU
    with pytest.raises(MokdError, match="--amp fp16 needs a CUDA device"):
        amp_dtype("fp16", CPU)


def test_full_precision_has_no_autocast_and_no_scaler():
    assert isinstance(autocast_context(CPU, None), nullcontext)
    assert make_scaler(None) is None and make_scaler(torch.bfloat16) is None
    context, scaler = autocast_for(CPU, "fp32")
    assert isinstance(context, nullcontext) and scaler is None
    with autocast_context(CPU, torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    loss = torch.tensor(2.0)
    assert scale_loss(loss, None) is loss


def test_optimizer_step_prepares_the_gradients_steps_and_frees_them():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    (weight * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    seen = []

    def hold_first() -> None:
        seen.append(weight.grad.clone())
        weight.grad[0] = 0.0

    optimizer_step(optimizer, None, before_step=hold_first)
    assert torch.equal(seen[0], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(weight.detach(), torch.tensor([1.0, 0.0, -0.5]))
    assert weight.grad is None


def test_rng_state_round_trips_torch_only_or_with_numpy_and_python():
    for with_host in (False, True):
        torch.manual_seed(1), np.random.seed(1), random.seed(1)
        state = capture_rng(numpy_and_python=with_host)
        assert ("numpy" in state) == ("python" in state) == with_host
        expected = (torch.rand(3), np.random.rand(), random.random())
        restore_rng(state)
        assert torch.equal(torch.rand(3), expected[0])
        if with_host:
            assert (np.random.rand(), random.random()) == expected[1:]


def test_optimizer_and_scaler_state_restore_into_a_fresh_run():
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.sum().backward()
    optimizer_step(optimizer)
    saved = {"optimizer": optimizer.state_dict(), "scaler": scaler_state(None)}
    assert saved["scaler"] is None
    fresh = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)
    restore_optimization(saved, fresh, None)
    assert torch.equal(fresh.state_dict()["state"][0]["momentum_buffer"], torch.ones(2))
