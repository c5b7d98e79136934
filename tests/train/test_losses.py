"""Loss terms against direct loops, center updates, and MOKD's cross objective."""

import pytest
import torch
import torch.distributed as dist

from mokd.core.errors import MokdError
from mokd_train.losses import (
    Centers,
    ModelStep,
    MokdCrossObjective,
    NonFiniteLossError,
    batch_center,
    distillation_loss,
    search_loss,
)

K, B = 16, 3


def cross_entropy(teacher_logits, student_logits, center, teacher_temp, student_temp=0.1):
    """H(t, s) for a batch, written out per sample."""
    total = 0.0
    for t, s in zip(teacher_logits, student_logits):
        sharpened = (t - center[0]) / teacher_temp
        q = torch.exp(sharpened - sharpened.max())
        q = q / q.sum()
        log_p = s / student_temp - torch.logsumexp(s / student_temp, dim=0)
        total += -(q * log_p).sum()
    return total / len(teacher_logits)


def test_distillation_loss_averages_all_cross_view_pairs():
    torch.manual_seed(0)
    n_local = 3
    teacher = torch.randn(2 * B, K)
    student = torch.randn((2 + n_local) * B, K)
    center = torch.randn(1, K)
    pairs = [(i, v) for i in range(2) for v in range(2 + n_local) if v != i]
    assert len(pairs) == 2 * (2 + n_local) - 2
    expected = sum(cross_entropy(teacher[i * B:(i + 1) * B], student[v * B:(v + 1) * B], center, 0.05)
                   for i, v in pairs) / len(pairs)
    assert distillation_loss(student, teacher, center, 0.05, 0.1).item() == pytest.approx(expected.item(), rel=1e-5)


def test_distillation_loss_gives_no_gradient_to_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(2 * B, K, requires_grad=True)
    student = torch.randn(4 * B, K, requires_grad=True)
    distillation_loss(student, teacher, torch.zeros(1, K), 0.04, 0.1).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_distillation_loss_rejects_misaligned_views():
    with pytest.raises(ValueError):
        distillation_loss(torch.randn(7, K), torch.randn(4, K), torch.zeros(1, K), 0.04, 0.1)


def test_search_loss_is_one_to_one_without_center():
    torch.manual_seed(0)
    student, target = torch.randn(4 * B, K), torch.randn(4 * B, K)
    expected = cross_entropy(target, student, torch.zeros(1, K), 0.06)
    assert search_loss(student, target, 0.06, 0.1).item() == pytest.approx(expected.item(), rel=1e-5)
    target.requires_grad_(True)
    search_loss(student.requires_grad_(True), target, 0.06, 0.1).backward()
    assert target.grad is None


def test_center_update_is_an_ema_of_batch_means():
    torch.manual_seed(0)
    centers = Centers(["sm1", "cm1"], K, momentum=0.9)
    first, second = torch.randn(2 * B, K), torch.randn(2 * B, K)
    centers.update({"sm1": batch_center(first)})
    centers.update({"sm1": batch_center(second), "cm1": batch_center(first)})
    expected = 0.9 * (0.1 * first.mean(dim=0)) + 0.1 * second.mean(dim=0)
    assert torch.allclose(centers["sm1"][0], expected, atol=1e-6)
    assert torch.allclose(centers["cm1"][0], 0.1 * first.mean(dim=0), atol=1e-6)
    assert dict(centers.state_dict()).keys() == {"sm1", "cm1"}


def test_center_update_averages_over_ranks(monkeypatch):
    """Two simulated ranks: the other rank's batch means are all ones."""
    def all_reduce(tensor):
        tensor.add_(torch.ones_like(tensor))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    centers = Centers(["sm1", "st1"], K, momentum=0.9)
    logits = torch.randn(2 * B, K)
    centers.update({"sm1": batch_center(logits), "st1": batch_center(2 * logits)})
    assert torch.allclose(centers["sm1"][0], 0.1 * (logits.mean(dim=0) + 1) / 2, atol=1e-6)
    assert torch.allclose(centers["st1"][0], 0.1 * (2 * logits.mean(dim=0) + 1) / 2, atol=1e-6)


def test_mokd_cross_objective_uses_the_peer_teacher():
    torch.manual_seed(0)
    objective = MokdCrossObjective()
    own = ModelStep(student_mlp=torch.randn(4 * B, K), student_thead_local=torch.randn(2 * B, K),
                    teacher_mlp=torch.randn(2 * B, K))
    peer = ModelStep(teacher_mlp=torch.randn(2 * B, K), teacher_search=torch.randn(2 * B, K))
    center = torch.randn(1, K)
    losses, centers = objective(own, peer, frozenset({"cm", "ct"}), {"cm": center}, 0.05, 0.1)
    assert losses["cm"].item() == pytest.approx(
        distillation_loss(own.student_mlp, peer.teacher_mlp, center, 0.05, 0.1).item())
    assert losses["ct"].item() == pytest.approx(
        search_loss(own.student_thead_local, peer.teacher_search, 0.05, 0.1).item())
    assert centers.keys() == {"cm"} and torch.allclose(centers["cm"], peer.teacher_mlp.mean(dim=0, keepdim=True))
    only_cm, _ = objective(own, peer, frozenset({"cm"}), {"cm": center}, 0.05, 0.1)
    assert only_cm.keys() == {"cm"}


def test_mokd_cross_objective_declares_what_it_reads():
    objective = MokdCrossObjective()
    assert objective.required_outputs(frozenset()) == frozenset()
    assert objective.required_outputs(frozenset({"cm"})) == {"student_mlp", "teacher_mlp"}
    assert objective.required_outputs(frozenset({"ct"})) == {"student_thead_local", "student_query", "teacher_search"}


def test_non_finite_loss_error_names_the_term():
    error = NonFiniteLossError("ct2")
    assert isinstance(error, MokdError) and error.term == "ct2"
    assert "ct2" in str(error) and "\n" not in str(error)
