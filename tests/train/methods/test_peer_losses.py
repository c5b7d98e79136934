"""DoGo and MCL loss terms against the closed forms of spec `online-kd-peers.md` and loop references."""

import math

import pytest
import torch
import torch.nn.functional as F

from mokd_train.methods.losses import (contrastive_ce, contrastive_logits, mcl_terms, nt_xent, relation_kl,
                                       relation_log_probs, soft_kd)

B = 4


def orthonormal(rows: int, dim: int = 16, offset: int = 0) -> torch.Tensor:
    return torch.eye(dim)[offset:offset + rows]


def collapsed(rows: int, dim: int = 16) -> torch.Tensor:
    return F.normalize(torch.ones(rows, dim), dim=1)


def test_nt_xent_closed_forms():
    z = orthonormal(B)
    assert nt_xent(z, z.clone()).item() == pytest.approx(math.log(1 + 6 * math.exp(-2)), abs=1e-6)
    assert nt_xent(z, z.clone()).item() == pytest.approx(0.5944377, abs=1e-6)
    assert nt_xent(collapsed(B), collapsed(B)).item() == pytest.approx(math.log(2 * B - 1), abs=1e-6)


def test_nt_xent_matches_a_per_anchor_loop():
    torch.manual_seed(0)
    z_x, z_y = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    views = torch.cat([z_x, z_y])
    total = 0.0
    for anchor in range(10):
        positive = (anchor + 5) % 10
        others = [j for j in range(10) if j != anchor]
        scores = torch.stack([views[anchor] @ views[j] / 0.5 for j in others])
        total += -(views[anchor] @ views[positive] / 0.5 - torch.logsumexp(scores, 0))
    assert nt_xent(z_x, z_y).item() == pytest.approx(total.item() / 10, abs=1e-5)


def test_relation_kl_closed_forms():
    own = relation_log_probs(orthonormal(B), orthonormal(B))
    peer = relation_log_probs(collapsed(B), collapsed(B))
    assert relation_kl(own, own.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert relation_kl(own, peer, "b2").item() == pytest.approx(1.5284605, abs=1e-6)
    assert relation_kl(own, peer, "batchmean").item() == pytest.approx(6.1138418, abs=1e-6)


def test_relation_matrix_is_view1_rows_by_view2_columns_and_the_peer_is_detached():
    torch.manual_seed(1)
    z_x, z_y = torch.randn(3, 6, requires_grad=True), torch.randn(3, 6)
    log_probs = relation_log_probs(z_x, z_y)
    for i in range(3):
        row = torch.stack([F.cosine_similarity(z_x[i], z_y[j], dim=0) / 0.1 for j in range(3)])
        torch.testing.assert_close(log_probs[i], torch.log_softmax(row, 0))
    peer = relation_log_probs(torch.randn(3, 6), torch.randn(3, 6)).requires_grad_(True)
    relation_kl(log_probs, peer).backward()
    assert peer.grad is None and z_x.grad is not None


def test_mcl_vcl_closed_forms():
    q = orthonormal(B)
    queue = orthonormal(8, offset=B)  # K = 8 keys orthogonal to every query
    vcl = contrastive_ce(contrastive_logits(q, q.clone(), queue))
    assert vcl.item() == pytest.approx(math.log(1 + 8 * math.exp(-1 / 0.07)), rel=1e-5)
    assert vcl.item() == pytest.approx(4.998987e-06, rel=1e-5)
    same = collapsed(B)
    full = contrastive_ce(contrastive_logits(same, same.clone(), collapsed(65536)))
    assert full.item() == pytest.approx(math.log(1 + 65536), abs=1e-5)
    assert full.item() == pytest.approx(11.0903701, abs=1e-5)


def test_identical_networks_give_zero_soft_terms_and_icl_equal_to_vcl():
    torch.manual_seed(2)
    q, k = F.normalize(torch.randn(B, 16), dim=1), F.normalize(torch.randn(B, 16), dim=1)
    queue = F.normalize(torch.randn(32, 16), dim=1)
    logits = contrastive_logits(q, k, queue)
    terms = mcl_terms(logits, logits.clone(), logits.clone(), logits.clone(), interactive=True)
    assert terms["kdv"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["kdi"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["icl"].item() == pytest.approx(terms["vcl"].item(), abs=1e-7)
    assert set(mcl_terms(logits, logits, logits, logits, interactive=False)) == {"vcl"}


def test_soft_kd_is_t_squared_batchmean_kl_from_the_detached_teacher():
    torch.manual_seed(3)
    student, teacher = torch.randn(5, 9, requires_grad=True), torch.randn(5, 9, requires_grad=True)
    p_teacher = torch.softmax(teacher.detach() / 3, 1)
    reference = 9 * (p_teacher * (p_teacher.log() - torch.log_softmax(student.detach() / 3, 1))).sum() / 5
    loss = soft_kd(student, teacher)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    loss.backward()
    assert teacher.grad is None and student.grad is not None


def test_contrastive_ce_equals_cross_entropy_at_target_zero():
    torch.manual_seed(4)
    logits = torch.randn(6, 11, dtype=torch.float64) * 5
    reference = F.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    assert contrastive_ce(logits).item() == pytest.approx(reference.item(), rel=1e-12)


def test_losses_stay_fp32_under_bf16_autocast():
    torch.manual_seed(5)
    z_x, z_y = F.normalize(torch.randn(8, 32), dim=1), F.normalize(torch.randn(8, 32), dim=1)
    queue = F.normalize(torch.randn(64, 32), dim=1)
    plain = (nt_xent(z_x, z_y), relation_log_probs(z_x, z_y), contrastive_logits(z_x, z_y, queue))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = (nt_xent(z_x, z_y), relation_log_probs(z_x, z_y), contrastive_logits(z_x, z_y, queue))
    for reference, value in zip(plain, mixed):
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, reference, rtol=0, atol=0)
