"""DoGo, MCL and the adapted dino+ methods at the pair level: layout, gradient isolation, references, queues, EMA."""

import copy

import pytest
import torch
import torch.nn.functional as F

from mokd_train.config import arch_specs, resolve_config
from mokd_train.optim import build_schedules
from mokd_train.methods.factory import build_peer_pair
from mokd_train.methods.losses import contrastive_logits, nt_xent, relation_kl, relation_log_probs

pytestmark = pytest.mark.slow  # trains the peer methods

B = 4
METHODS = ("dogo", "mcl", "dino+dogo", "dino+mcl")


def make_cfg(method: str, **overrides):
    settings = dict(method=method, output_dir="unused", img_size=16, local_size=8, arch2="test_vit", out_dim=64,
                    mlp_hidden_dim=32, mlp_bottleneck_dim=16, batch_size=B, drop_path=0.0)
    if method.endswith("mcl"):  # only the MCL methods have a queue (others refuse the setting)
        settings["queue_size"] = 4 * B
    settings.update(overrides)
    return resolve_config("tiny", None, settings)


def make_pair(method: str, **overrides):
    cfg = make_cfg(method, **overrides)
    torch.manual_seed(0)
    return build_peer_pair(arch_specs(cfg), cfg)


def make_crops(pair, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sizes = [16, 16] + [8] * pair.cfg.n_local
    return [torch.randn(B, 3, size, size, generator=generator) for size in sizes]


@pytest.fixture(scope="module", params=METHODS)
def base_pair(request):
    return make_pair(request.param)


def trainable(module):
    return [param for param in module.parameters() if param.requires_grad]


def test_networks_use_the_names_mokd_eval_reads():
    expected = {"dogo": ({"backbone", "head"}, False), "mcl": ({"backbone", "fc"}, True),
                "dino+dogo": ({"backbone", "head"}, True), "dino+mcl": ({"backbone", "head", "fc"}, True)}
    for method, (prefixes, has_teachers) in expected.items():
        pair = make_pair(method)
        for student in pair.students:
            assert {name.split(".")[0] for name in student.state_dict()} == prefixes, method
        assert len(pair.teachers) == (2 if has_teachers else 0), method
        assert pair.eval_keys == ("student1", "student2")
    head = make_pair("dogo").students[0].head
    assert head.fc1.bias is None and head.fc1.out_features == 512 and head.fc2.out_features == 128
    assert make_pair("mcl").students[1].fc.out_features == 128
    assert make_cfg("dogo").n_local == 0 and make_cfg("mcl").n_local == 0 and make_cfg("dino+dogo").n_local == 2
    assert (make_cfg("dogo").lambda1, make_cfg("dogo").lambda2) == (100.0, 1.0)
    assert (make_cfg("mcl").lambda1, make_cfg("mcl").lambda2) == (1.0, 1.0)


def test_each_model_loss_reaches_only_its_own_student(base_pair):
    for index in (0, 1):
        pair = copy.deepcopy(base_pair)
        losses = pair.compute_losses(make_crops(pair), epoch=0)
        losses[index].backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable(pair.students[index]))
        assert all(p.grad is None for p in pair.students[1 - index].parameters()), pair.method
        assert all(p.grad is None for teacher in pair.teachers for p in teacher.parameters())


def test_one_combined_backward_equals_two_separate_ones(base_pair):
    combined = copy.deepcopy(base_pair)
    loss1, loss2, _ = combined.compute_losses(make_crops(combined), epoch=0)
    (loss1 + loss2).backward()
    for index in (0, 1):
        separate = copy.deepcopy(base_pair)
        losses = separate.compute_losses(make_crops(separate), epoch=0)
        losses[index].backward()
        for mine, theirs in zip(trainable(combined.students[index]), trainable(separate.students[index])):
            if theirs.grad is None:
                assert mine.grad is None
            else:
                torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-7)


def test_dogo_terms_match_a_reference_built_from_the_networks():
    pair = make_pair("dogo")
    crops = make_crops(pair)
    reference = copy.deepcopy(pair)
    _, _, stats = pair.compute_losses(crops, epoch=0)
    views = []
    for student in reference.students:
        z = F.normalize(student.head(student.pooled(torch.cat(crops))), dim=-1)
        views.append((z[:B], z[B:]))
    relations = [relation_log_probs(*view) for view in views]
    for i in (0, 1):
        assert stats[f"ntx{i + 1}"] == pytest.approx(nt_xent(*views[i]).item(), rel=1e-5)
        kl = relation_kl(relations[i], relations[1 - i]).item()
        assert stats[f"kl{i + 1}"] == pytest.approx(kl, rel=1e-5)
        assert stats[f"loss{i + 1}"] == pytest.approx(stats[f"ntx{i + 1}"] + pair.lambdas[i] * kl, rel=1e-5)


def test_mcl_terms_match_a_reference_and_queues_fill_in_lock_step():
    pair = make_pair("mcl")
    queues_before = [queue.clone() for queue in pair.queues]
    reference = copy.deepcopy(pair)
    crops = make_crops(pair)
    _, _, stats = pair.compute_losses(crops, epoch=0)
    q = [F.normalize(s.fc(s.pooled(crops[0])), dim=-1) for s in reference.students]
    k = [F.normalize(t.fc(t.pooled(crops[1])), dim=-1) for t in reference.teachers]
    for i in (0, 1):
        j = 1 - i
        within, across = (contrastive_logits(q[i], k[i], queues_before[i]),
                          contrastive_logits(q[i], k[j], queues_before[j]))
        assert stats[f"vcl{i + 1}"] == pytest.approx(F.cross_entropy(within.double(), torch.zeros(B, dtype=torch.long)).item(),
                                                     rel=1e-5)
        assert stats[f"icl{i + 1}"] == pytest.approx(F.cross_entropy(across.double(), torch.zeros(B, dtype=torch.long)).item(),
                                                     rel=1e-5)
        # both queues took their own network's keys of the same images at the same rows
        torch.testing.assert_close(pair.queues[i][:B], k[i].detach())
        torch.testing.assert_close(pair.queues[i][B:], queues_before[i][B:])
    assert int(pair.queue_ptr) == B
    for step in range(3):
        pair.compute_losses(make_crops(pair, seed=2 + step), epoch=0)
    assert int(pair.queue_ptr) == 0  # 4 batches of B fill K = 4B and wrap


def test_identical_networks_give_zero_soft_terms():
    dogo = make_pair("dogo", arch2="r_tiny")
    dogo.students[1].load_state_dict(dogo.students[0].state_dict())
    _, _, stats = dogo.compute_losses(make_crops(dogo), epoch=0)
    assert stats["kl1"] == pytest.approx(0.0, abs=1e-7) and stats["kl2"] == pytest.approx(0.0, abs=1e-7)
    mcl = make_pair("mcl", arch2="r_tiny")
    mcl.students[1].load_state_dict(mcl.students[0].state_dict())
    mcl.teachers[1].load_state_dict(mcl.teachers[0].state_dict())
    mcl.queue2.copy_(mcl.queue1)
    _, _, stats = mcl.compute_losses(make_crops(mcl), epoch=0)
    for i in (1, 2):
        assert stats[f"kdv{i}"] == pytest.approx(0.0, abs=1e-6) and stats[f"kdi{i}"] == pytest.approx(0.0, abs=1e-6)
        assert stats[f"icl{i}"] == pytest.approx(stats[f"vcl{i}"], rel=1e-6)


def test_mcl_key_encoders_are_a_constant_momentum_ema_of_the_query_encoders():
    pair = make_pair("mcl")
    for student in pair.students:
        with torch.no_grad():
            for param in student.parameters():
                param.add_(torch.randn_like(param))
    before = [[p.clone() for p in teacher.parameters()] for teacher in pair.teachers]
    pair.update_teachers(0.999)
    for teacher, student, old in zip(pair.teachers, pair.students, before):
        for new, s, o in zip(teacher.parameters(), student.parameters(), old):
            torch.testing.assert_close(new, 0.999 * o + 0.001 * s)
    # the engine holds MCL's momentum constant (whatever momentum_teacher_end says); the adaptation follows DINO's
    # cosine from the configured start (the tiny preset's 0.99) to momentum_teacher_end (DINO's 1 here)
    mcl_schedule = build_schedules(make_cfg("mcl", momentum_teacher_end=1.0), steps_per_epoch=5).momentum
    assert mcl_schedule.min() == mcl_schedule.max() == pytest.approx(0.999)
    dino_cfg = make_cfg("dino+mcl", momentum_teacher_end=1.0)
    dino_schedule = build_schedules(dino_cfg, steps_per_epoch=5).momentum
    assert dino_schedule[0] == pytest.approx(dino_cfg.momentum_teacher) and dino_schedule[-1] > 0.9999


@pytest.mark.parametrize("method,terms", [
    ("dogo", {"ntx1", "ntx2"}), ("mcl", {"vcl1", "vcl2"}),
    ("dino+dogo", {"sm1", "sm2"}), ("dino+mcl", {"sm1", "sm2"})])
def test_independent_mode_keeps_only_each_models_self_term(method, terms):
    pair = make_pair(method, mode="independent")
    _, _, stats = pair.compute_losses(make_crops(pair), epoch=0)
    assert set(stats) == terms | {"loss1", "loss2"}
    assert stats["loss1"] == pytest.approx(stats[min(terms)])


def test_adapted_methods_add_the_peer_cross_terms_to_dino():
    _, _, stats = (pair := make_pair("dino+dogo")).compute_losses(make_crops(pair), epoch=0)
    assert set(stats) == {"sm1", "kl1", "sm2", "kl2", "loss1", "loss2"}
    _, _, stats = (pair := make_pair("dino+mcl")).compute_losses(make_crops(pair), epoch=0)
    assert set(stats) == {"sm1", "kdv1", "icl1", "kdi1", "sm2", "kdv2", "icl2", "kdi2", "loss1", "loss2"}
    assert stats["loss1"] == pytest.approx(stats["sm1"] + stats["kdv1"] + stats["icl1"] + stats["kdi1"], rel=1e-5)


def test_optimisation_recipes():
    dogo = make_pair("dogo")
    optimizer = dogo.build_optimizer(0)
    assert isinstance(optimizer, torch.optim.Adam) and not isinstance(optimizer, torch.optim.AdamW)
    assert {group["lr"] for group in optimizer.param_groups} == {3e-4}
    assert {group["weight_decay"] for group in optimizer.param_groups} == {1e-6}
    mcl = make_pair("mcl", epochs=200)
    optimizer = mcl.build_optimizer(1)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    assert {group["weight_decay"] for group in optimizer.param_groups} == {1e-4}
    rates = [mcl.learning_rate(epoch * 10, 10) for epoch in (0, 119, 120, 159, 160, 199)]
    assert rates == pytest.approx([0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003])
