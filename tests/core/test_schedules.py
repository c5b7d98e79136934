"""Per-iteration cosine schedule and per-epoch teacher temperature, against closed forms."""

import math

import numpy as np
import pytest

from mokd.core.errors import MokdError
from mokd.core.schedules import cosine_schedule
from mokd.core.schedules import teacher_temperature_schedule


def test_cosine_schedule_warmup_then_cosine_closed_form():
    base, final, start, epochs, iters, warmup = 0.5, 0.01, 0.1, 6, 5, 2
    values = cosine_schedule(base, final, epochs, iters, warmup_epochs=warmup, start_warmup_value=start)
    assert values.shape == (epochs * iters,)
    warmup_iters = warmup * iters
    for i in range(warmup_iters):
        assert values[i] == pytest.approx(start + (base - start) * i / (warmup_iters - 1))
    cosine_iters = epochs * iters - warmup_iters
    for k in range(cosine_iters):
        expected = final + 0.5 * (base - final) * (1 + math.cos(math.pi * k / cosine_iters))
        assert values[warmup_iters + k] == pytest.approx(expected)
    assert values[warmup_iters] == pytest.approx(base)
    assert np.all(np.diff(values[warmup_iters:]) < 0)


def test_cosine_schedule_without_warmup_rises_for_ema_momentum():
    values = cosine_schedule(0.996, 1.0, 3, 4)
    assert values[0] == pytest.approx(0.996)
    assert values[-1] == pytest.approx(1.0 - 0.002 * (1 + math.cos(math.pi * 11 / 12)))
    assert np.all(np.diff(values) > 0) and values.max() < 1.0


def test_cosine_schedule_rejects_warmup_longer_than_training():
    with pytest.raises(MokdError, match="warm-up"):
        cosine_schedule(0.1, 0.0, 5, 10, warmup_epochs=6)
    with pytest.raises(MokdError):
        cosine_schedule(0.1, 0.0, 5, 0)


def test_teacher_temperature_linear_warmup_then_constant():
    temps = teacher_temperature_schedule(0.04, 0.07, 30, 100)
    assert temps.shape == (100,)
    for epoch in (0, 1, 15, 29):
        assert temps[epoch] == pytest.approx(0.04 + 0.03 * epoch / 29)
    assert np.all(temps[29:] == pytest.approx(0.07))


def test_teacher_temperature_warmup_longer_than_training_is_truncated():
    temps = teacher_temperature_schedule(0.04, 0.07, 50, 30)
    assert temps.shape == (30,)
    assert temps[29] == pytest.approx(0.04 + 0.03 * 29 / 49)
    assert temps.max() < 0.07


def test_teacher_temperature_without_warmup_is_constant():
    assert np.all(teacher_temperature_schedule(0.04, 0.07, 0, 4) == 0.07)


def test_cosine_schedule_fractional_warmup_counts_rounded_iterations():
    """A warm-up of 0.5 epochs of 44 iterations is 22 iterations: linspace(0, base, 22), then the cosine."""
    values = cosine_schedule(0.5, 0.0, 4, 44, warmup_epochs=0.5)
    assert values[:22] == pytest.approx(np.linspace(0.0, 0.5, 22))
    cosine_iters = 4 * 44 - 22
    assert values[22:] == pytest.approx(0.25 * (1 + np.cos(np.pi * np.arange(cosine_iters) / cosine_iters)))
    assert np.array_equal(cosine_schedule(0.5, 0.0, 4, 44, warmup_epochs=1),
                          cosine_schedule(0.5, 0.0, 4, 44, warmup_epochs=1.0))
