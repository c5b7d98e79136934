"""Hyper-parameter schedules shared by the trainer and the evaluation protocols, precomputed as numpy arrays
indexed by iteration or epoch (DINO's convention)."""

from __future__ import annotations

import numpy as np

from mokd.core.errors import MokdError


def cosine_schedule(base_value: float, final_value: float, epochs: int, iters_per_epoch: int,
                    warmup_epochs: float = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """One value per iteration: linear warm-up from `start_warmup_value` to `base_value` over
    `warmup_epochs`, then a half cosine from `base_value` down (or up) to `final_value`.

    Used for learning rates, weight decay and the EMA momentum. A fractional `warmup_epochs` warms up over
    that share of the iterations (rounded): a run of a few hundred steps needs a warm-up of tens of steps.
    """
    if epochs < 1 or iters_per_epoch < 1:
        raise MokdError(f"a schedule needs at least one epoch and one iteration per epoch "
                        f"(got {epochs} epochs, {iters_per_epoch} iterations): use more data or a smaller batch")
    if not 0 <= warmup_epochs <= epochs:
        raise MokdError(f"warm-up of {warmup_epochs} epochs does not fit in {epochs} training epochs: "
                        f"lower the warm-up epochs")
    warmup_iters = round(warmup_epochs * iters_per_epoch)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    steps = np.arange(epochs * iters_per_epoch - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warmup, cosine])


def teacher_temperature_schedule(warmup_temp: float, final_temp: float, warmup_epochs: int,
                                 epochs: int) -> np.ndarray:
    """One teacher temperature per epoch: linear from `warmup_temp` (epoch 0) to `final_temp`
    (epoch `warmup_epochs - 1`), then constant.

    A warm-up longer than the training (the official code's 50 warm-up epochs for the CNN's self
    terms in a shorter run) is valid: the run simply ends part-way up the ramp.
    """
    ramp = np.linspace(warmup_temp, final_temp, warmup_epochs)
    plateau = np.full(max(epochs - warmup_epochs, 0), final_temp)
    return np.concatenate([ramp, plateau])[:epochs]
