"""Collapse monitor: closed-form values and the warnings that name the cause."""

import math

import pytest
import torch

from mokd_train.losses import distillation_loss
from mokd_train.monitor import diagnose, mean_pairwise_cosine, target_entropy


def test_target_entropy_closed_forms():
    k = 16
    uniform = torch.zeros(4, k)  # equal logits: uniform targets
    assert target_entropy(uniform, torch.zeros(1, k), 0.04) == pytest.approx(math.log(k))
    two_way = torch.full((4, k), -1e4)
    two_way[:, :2] = 0.0  # two equal logits, the rest far below: entropy ln 2
    assert target_entropy(two_way, torch.zeros(1, k), 0.04) == pytest.approx(math.log(2), abs=1e-6)
    # the center is subtracted before sharpening: centring two_way's pattern away leaves a uniform target
    assert target_entropy(two_way, two_way[:1], 0.04) == pytest.approx(math.log(k))


def test_kl_is_the_loss_minus_the_teacher_entropy():
    """sm = mean over (teacher view, other student view) pairs of H(t) + KL(t || s): check against a direct sum."""
    torch.manual_seed(0)
    batch, k, views = 3, 8, 4
    teacher, student, center = torch.randn(2 * batch, k), torch.randn(views * batch, k), torch.randn(1, k) * 0.1
    loss = distillation_loss(student, teacher, center, 0.07, 0.1)
    targets = torch.softmax((teacher - center) / 0.07, dim=-1).view(2, batch, k)
    log_s = torch.log_softmax(student / 0.1, dim=-1).view(views, batch, k)
    kls = [(targets[t] * (targets[t].log() - log_s[v])).sum(-1).mean() for t in range(2) for v in range(views) if v != t]
    kl = float(torch.stack(kls).mean())
    assert float(loss) - target_entropy(teacher, center, 0.07) == pytest.approx(kl, rel=1e-5)


def test_mean_pairwise_cosine():
    same = torch.ones(5, 3) * torch.tensor([1.0, 2.0, 3.0])
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)
    orthogonal = torch.eye(4)
    assert mean_pairwise_cosine(orthogonal) == pytest.approx(0.0)
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert mean_pairwise_cosine(opposite) == pytest.approx(-1.0)


def test_diagnose_names_the_likely_cause():
    k = 256
    assert diagnose({"teacher_entropy": 0.5 * math.log(k), "kl": 1.0, "student_cos": 0.5}, "m", k) == []
    (uniform,) = diagnose({"teacher_entropy": 0.99 * math.log(k), "kl": 0.01, "student_cos": 0.5}, "m", k)
    assert "uniform collapse" in uniform and "teacher temperature" in uniform
    (dimensional,) = diagnose({"teacher_entropy": 0.01, "kl": 0.01, "student_cos": 0.5}, "m", k)
    assert "dimensional collapse" in dimensional and "raise the teacher temperature" in dimensional
    (same,) = diagnose({"teacher_entropy": 0.5 * math.log(k), "kl": 0.2, "student_cos": 0.999}, "m", k)
    assert "representation collapse" in same
