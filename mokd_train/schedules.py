"""Hyper-parameter schedules, precomputed as numpy arrays indexed by iteration or epoch (DINO's convention)."""

from __future__ import annotations

import numpy as np



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
