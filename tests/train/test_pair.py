"""MokdPair: every term against a per-crop reference, gradient isolation, EMA, the search pairing, switches."""

import copy
from types import SimpleNamespace

import pytest
import torch
from timm.layers import DropPath
from torch import nn

from mokd.core.errors import MokdError
from mokd.core.registry import forward_tokens, resolve_arch
from mokd_train.losses import NonFiniteLossError
from mokd_train.pair import MokdPair, PairConfig, build_network, thead_width

pytestmark = pytest.mark.slow  # runs full pair steps

B, N_LOCAL, K = 2, 2, 64
CNN = resolve_arch("r_tiny")
VIT = resolve_arch("vit_t", img_size=32, patch_size=4)
ALL_TERMS = ("sm", "st", "cm", "ct")


def make_cfg(**overrides) -> PairConfig:
    settings = dict(out_dim=K, mlp_hidden_dim=32, mlp_bottleneck_dim=16, n_local=N_LOCAL, epochs=100)
    settings.update(overrides)
    return PairConfig(**settings)


def make_crops(seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return ([torch.randn(B, 3, 32, 32, generator=generator) for _ in range(2)]
            + [torch.randn(B, 3, 16, 16, generator=generator) for _ in range(N_LOCAL)])


@pytest.fixture(scope="module")
def base_pair() -> MokdPair:
    torch.manual_seed(0)
    return MokdPair(CNN, VIT, make_cfg())


@pytest.fixture
def pair(base_pair: MokdPair) -> MokdPair:
    return variant(base_pair)


def variant(base: MokdPair, **overrides) -> MokdPair:
    """A pair with other settings but the weights of `base` (built on the meta device: no init cost)."""
    with torch.device("meta"):
        other = MokdPair(CNN, VIT, make_cfg(**overrides))
    other.to_empty(device="cpu")
    other.load_state_dict(base.state_dict())
    return other


def trainable(network: nn.Module) -> list[nn.Parameter]:
    return [p for p in network.parameters() if p.requires_grad]


# ---------------------------------------------------------------- reference computation, one crop at a time

def ramp(epoch: int, warmup_epochs: int) -> float:
    return 0.04 + 0.03 * min(epoch, warmup_epochs - 1) / (warmup_epochs - 1)


def cross_entropy(teacher, student, center, teacher_temp):
    q = torch.softmax((teacher - center) / teacher_temp, dim=-1)
    return -(q * torch.log_softmax(student / 0.1, dim=-1)).sum(dim=-1).mean()


def dino(teacher_views, student_views, center, teacher_temp):
    pairs = [(i, v) for i in range(2) for v in range(len(student_views)) if v != i]
    return sum(cross_entropy(teacher_views[i], student_views[v], center, teacher_temp) for i, v in pairs) / len(pairs)


@torch.no_grad()
def per_crop_outputs(pair: MokdPair, crops: list[torch.Tensor]) -> list[dict]:
    outputs = []
    for student, teacher in zip(pair.students, pair.teachers):
        features = [student.features(crop) for crop in crops]
        teacher_features = [teacher.features(crop) for crop in crops[:2]]
        outputs.append({
            "mlp": [student.head(pooled) for pooled, _ in features],
            "thead": [student.transhead(fmap) for _, fmap in features],
            "queries": [student.transhead.project(pooled) if student.spec.is_vit else student.transhead.tokens(fmap)[1]
                        for pooled, fmap in features[2:]],
            "teacher_mlp": [teacher.head(pooled) for pooled, _ in teacher_features],
            "teacher_thead": [teacher.transhead(fmap) for _, fmap in teacher_features],
            "teacher_map_crop1": teacher_features[0][1],
        })
    return outputs


@torch.no_grad()
def reference_terms(pair: MokdPair, outputs: list[dict], epoch: int) -> dict[str, torch.Tensor]:
    terms = {}
    cross_temp = ramp(epoch, 30)
    for i in (0, 1):
        own, peer, n = outputs[i], outputs[1 - i], str(i + 1)
        self_temp = ramp(epoch, 30 if pair.specs[i].is_vit else 50)  # the official code's CNN quirk
        terms["sm" + n] = dino(own["teacher_mlp"], own["mlp"], pair.centers["sm" + n], self_temp)
        terms["st" + n] = dino(own["teacher_thead"], own["thead"], pair.centers["st" + n], self_temp)
        terms["cm" + n] = dino(peer["teacher_mlp"], own["mlp"], pair.centers["cm" + n], cross_temp)
        peer_teacher_head = pair.teachers[1 - i].transhead
        targets = [peer_teacher_head(peer["teacher_map_crop1"], query) for query in own["queries"]]
        terms["ct" + n] = sum(cross_entropy(target, student, 0.0, cross_temp)
                              for target, student in zip(targets, own["thead"][2:])) / N_LOCAL
    return terms


# ---------------------------------------------------------------- construction

def test_networks_follow_the_official_layout(base_pair):
    cnn_keys = base_pair.students[0].state_dict().keys()
    for key in ("backbone.conv1.weight", "backbone.layer4.0.conv1.weight", "head.mlp.0.weight",
                "head.last_layer.weight_g", "transhead.pos_embed", "transhead.patch_embed.weight",
                "transhead.blocks.2.attn.qkv.weight", "transhead.norm.weight", "transhead.last_layer.weight_v"):
        assert key in cnn_keys
    vit_keys = base_pair.students[1].state_dict().keys()
    assert {"backbone.cls_token", "backbone.blocks.11.attn.qkv.weight", "transhead.pos_embed"} <= vit_keys
    assert not any(key.startswith(("transhead.patch_embed", "transhead.input_proj")) for key in vit_keys)
    assert base_pair.students[0].transhead.pos_embed.shape == (1, 4 * 4, 192)  # 32 px / 8 (CIFAR stem)
    assert base_pair.students[1].transhead.pos_embed.shape == (1, 8 * 8, 192)  # 32 px / patch 4
    for student, teacher in zip(base_pair.students, base_pair.teachers):
        assert student.state_dict().keys() == teacher.state_dict().keys()


def test_teachers_start_as_frozen_copies_without_drop_path(base_pair):
    for student, teacher in zip(base_pair.students, base_pair.teachers):
        student_state = student.state_dict()
        assert all(torch.equal(value, student_state[key]) for key, value in teacher.state_dict().items())
        assert not any(p.requires_grad for p in teacher.parameters())
    assert base_pair.students[1].backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    student_rates = [m.drop_prob for m in base_pair.students[1].modules() if isinstance(m, DropPath)]
    teacher_rates = [m.drop_prob for m in base_pair.teachers[1].modules() if isinstance(m, DropPath)]
    assert len(teacher_rates) == len(student_rates) > 0 and not any(teacher_rates)


def test_only_the_cnn_mlp_head_freezes_weight_g(base_pair):
    cnn, vit = base_pair.students
    assert not cnn.head.last_layer.weight_g.requires_grad and vit.head.last_layer.weight_g.requires_grad
    assert cnn.transhead.last_layer.weight_g.requires_grad and vit.transhead.last_layer.weight_g.requires_grad


def test_thead_width_rule():
    vit_s = resolve_arch("vit_s")
    assert thead_width(CNN, VIT, make_cfg()) == (192, 6)
    assert thead_width(CNN, CNN, make_cfg()) == (384, 6)
    assert thead_width(VIT, vit_s, make_cfg()) == (384, 6)
    assert thead_width(CNN, CNN, make_cfg(thead_dim=128)) == (128, 2)
    assert thead_width(CNN, VIT, make_cfg(thead_dim=96, thead_heads=4)) == (96, 4)
    with pytest.raises(MokdError, match="thead_heads"):
        thead_width(CNN, VIT, make_cfg(thead_dim=200, thead_heads=3))


def test_pair_config_validation():
    with pytest.raises(MokdError, match="mode"):
        make_cfg(mode="dino")
    with pytest.raises(MokdError, match="loss terms"):
        make_cfg(losses=("sm", "kd"))
    with pytest.raises(MokdError, match="loss terms"):
        make_cfg(losses=())
    with pytest.raises(MokdError, match="local crops"):
        make_cfg(n_local=0)
    assert make_cfg(n_local=0, losses=["sm", "cm"]).losses == ("sm", "cm")
    assert make_cfg(losses=("ct", "sm")).enabled_terms == ("sm", "ct")
    assert make_cfg(mode="independent").enabled_terms == ("sm",)


def test_teacher_temperatures_follow_the_code_quirk_or_the_paper():
    for cnn_self, expected_self in ((50, ramp(20, 50)), (None, ramp(20, 30))):
        with torch.device("meta"):
            pair = MokdPair(CNN, CNN, make_cfg(thead_dim=48, cnn_self_warmup_epochs=cnn_self))
        temps = pair.teacher_temperatures(20)
        for name in ("sm1", "st1", "sm2", "st2"):
            assert temps[name] == pytest.approx(expected_self)
        for name in ("cm1", "ct1", "cm2", "ct2"):
            assert temps[name] == pytest.approx(ramp(20, 30))


# ---------------------------------------------------------------- loss terms

@pytest.fixture(scope="module")
def eval_run(base_pair):
    """One step in eval mode (BN on running statistics, no drop path: per-crop and batched forwards agree),
    with random centers and the inputs of both teachers' first T-Head block recorded."""
    pair = copy.deepcopy(base_pair).eval()
    torch.manual_seed(2)
    with torch.no_grad():
        for center in pair.centers.buffers():
            center.normal_()
    crops, epoch = make_crops(), 10
    run = SimpleNamespace(pair=pair, crops=crops, centers_before=pair.centers_state_dict(),
                          outputs=per_crop_outputs(pair, crops), block_inputs={0: [], 1: []})
    run.expected = reference_terms(pair, run.outputs, epoch)
    hooks = [pair.teachers[j].transhead.blocks[0].register_forward_pre_hook(
        lambda module, args, j=j: run.block_inputs[j].append(args[0].clone())) for j in (0, 1)]
    run.loss1, run.loss2, run.stats = pair.compute_losses(crops, epoch)
    for hook in hooks:
        hook.remove()
    run.centers_after = pair.centers_state_dict()
    return run


def test_every_term_matches_a_per_crop_reference(eval_run):
    expected, stats = eval_run.expected, eval_run.stats
    for name, value in expected.items():
        assert stats[name] == pytest.approx(value.item(), rel=1e-4), name
    lambda1, lambda2 = eval_run.pair.lambdas
    for loss, n, lam in ((eval_run.loss1, "1", lambda1), (eval_run.loss2, "2", lambda2)):
        total = expected["sm" + n] + expected["st" + n] + lam * (expected["cm" + n] + expected["ct" + n])
        assert loss.item() == pytest.approx(total.item(), rel=1e-4)
        assert stats["loss" + n] == pytest.approx(loss.item())


def test_centers_move_towards_their_teachers_batch_mean(eval_run):
    before, after, outputs = eval_run.centers_before, eval_run.centers_after, eval_run.outputs
    for i, n in ((0, "1"), (1, "2")):
        sources = {"sm": outputs[i]["teacher_mlp"], "st": outputs[i]["teacher_thead"],
                   "cm": outputs[1 - i]["teacher_mlp"]}
        for term, views in sources.items():
            batch_mean = torch.cat(views).mean(dim=0, keepdim=True)
            assert torch.allclose(after[term + n], 0.9 * before[term + n] + 0.1 * batch_mean, atol=1e-5)


def test_search_attends_over_global_crop_one_of_the_same_image(eval_run):
    pair, outputs = eval_run.pair, eval_run.outputs
    for i in (0, 1):
        peer_teacher = pair.teachers[1 - i]
        with torch.no_grad():
            crop1_tokens = peer_teacher.transhead.tokens(outputs[1 - i]["teacher_map_crop1"])[0]
        searches = [x for x in eval_run.block_inputs[1 - i] if x.shape[1] == crop1_tokens.shape[1] + 1]
        assert len(searches) == 1 and searches[0].shape[0] == N_LOCAL * B
        for v in range(N_LOCAL):
            for b in range(B):
                row = searches[0][v * B + b]
                assert torch.allclose(row[0], outputs[i]["queries"][v][b], atol=1e-5)
                assert torch.allclose(row[1:], crop1_tokens[b], atol=1e-5)


def test_search_queries_are_detached(base_pair):
    crops = make_crops()
    for student in base_pair.students:
        out = student(torch.cat(crops[:2]), torch.cat(crops[2:]), outputs=frozenset({"thead_local", "query"}))
        assert out["thead_local"].requires_grad and not out["query"].requires_grad
        assert out["query"].shape == (N_LOCAL * B, 192)


def test_vit_query_is_its_cls_token_projected_to_the_thead_width():
    torch.manual_seed(0)
    network = build_network(VIT, make_cfg(), thead_dim=96, thead_heads=6, drop_path_rate=0.0).eval()
    crops = make_crops()
    local_crops = torch.cat(crops[2:])
    out = network(torch.cat(crops[:2]), local_crops, outputs=frozenset({"query"}))
    proj = network.transhead.input_proj
    assert proj.weight.shape == (96, 192)
    cls = forward_tokens(network.backbone, VIT, local_crops)[0]
    assert torch.allclose(out["query"], cls @ proj.weight.T + proj.bias, atol=1e-5)
    assert not out["query"].requires_grad and out.keys() == {"query"}


# ---------------------------------------------------------------- gradients and EMA

def test_losses_never_reach_the_other_model_nor_the_teachers(pair):
    teacher_params = [[p.detach().clone() for p in t.parameters()] for t in pair.teachers]
    loss1, loss2, _ = pair.compute_losses(make_crops(), 0)
    params1, params2 = trainable(pair.students[0]), trainable(pair.students[1])
    assert all(g is None for g in torch.autograd.grad(loss1, params2, retain_graph=True, allow_unused=True))
    assert all(g is None for g in torch.autograd.grad(loss2, params1, retain_graph=True, allow_unused=True))
    separate = (torch.autograd.grad(loss1, params1, retain_graph=True)
                + torch.autograd.grad(loss2, params2, retain_graph=True))
    (loss1 + loss2).backward()
    for param, grad in zip(params1 + params2, separate):  # one combined backward == two separate ones
        assert torch.allclose(param.grad, grad, atol=1e-6)
    for teacher, old in zip(pair.teachers, teacher_params):
        assert all(p.grad is None for p in teacher.parameters())
        assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), old))


def test_backward_per_model_runs_before_the_other_student_and_equals_one_combined_backward(base_pair):
    """compute_losses(backward=...) back-propagates L1 before student 2 runs (one graph alive at a time) and
    leaves exactly the gradients of backward(L1 + L2)."""
    crops = make_crops()
    combined = variant(base_pair)
    torch.manual_seed(5)  # the same drop-path draws in both runs
    loss1, loss2, stats_combined = combined.compute_losses(crops, 0)
    (loss1 + loss2).backward()

    sequential = variant(base_pair)
    events = []
    for index, student in enumerate(sequential.students):
        student.register_forward_pre_hook(lambda module, args, index=index: events.append(("forward", index)))

    def backward(losses):
        events.append(("backward", *losses))
        sum(losses.values()).backward()

    torch.manual_seed(5)
    _, _, stats_sequential = sequential.compute_losses(crops, 0, backward=backward)
    assert events == [("forward", 0), ("backward", 0), ("forward", 1), ("backward", 1)]
    assert stats_sequential == pytest.approx(stats_combined, rel=1e-6)
    for index in (0, 1):
        for (name, expected), param in zip(trainable_named(combined.students[index]),
                                           trainable(sequential.students[index])):
            torch.testing.assert_close(param.grad, expected.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_each_model_updated_inside_its_backward_equals_both_updated_at_the_end(base_pair):
    """The engine steps model 1 as soon as L1 is back-propagated, so its gradients are freed before student 2
    runs. L2 reads teacher 1, never student 1, so the losses and both updated students equal one backward of
    L1 + L2 followed by the two optimizer steps."""
    from mokd_train.engine import update_model
    from mokd_train.optim import build_optimizer

    def optimizers_of(pair):
        optimizers = [build_optimizer(pair, index) for index in (0, 1)]
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group.update(lr=0.05, weight_decay=0.04 if group["regularized"] else 0.0)
        return optimizers

    crops = make_crops()
    at_end, early = variant(base_pair), variant(base_pair)
    end_optimizers, early_optimizers = optimizers_of(at_end), optimizers_of(early)
    torch.manual_seed(5)
    loss1, loss2, stats_at_end = at_end.compute_losses(crops, 0)
    (loss1 + loss2).backward()
    for index in (0, 1):
        update_model(at_end, index, end_optimizers[index], clip_grad=3.0, hold_last_layers=False)

    grads_when_student2_runs = []
    early.students[1].register_forward_pre_hook(
        lambda module, args: grads_when_student2_runs.append([p.grad for p in trainable(early.students[0])]))

    def backward_and_step(losses):
        sum(losses.values()).backward()
        for index in losses:
            update_model(early, index, early_optimizers[index], clip_grad=3.0, hold_last_layers=False)

    torch.manual_seed(5)
    _, _, stats_early = early.compute_losses(crops, 0, backward=backward_and_step)
    assert stats_early == pytest.approx(stats_at_end, rel=1e-6)
    assert grads_when_student2_runs and all(grad is None for grad in grads_when_student2_runs[0])
    for index in (0, 1):
        moved = [not torch.equal(p, q) for p, q in zip(trainable(early.students[index]),
                                                        trainable(base_pair.students[index]))]
        assert sum(moved) > len(moved) // 2  # the step really updated the student
        for (name, expected), param in zip(trainable_named(at_end.students[index]), trainable(early.students[index])):
            torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-6, msg=name)
            assert param.grad is None  # freed after the step


def trainable_named(network: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in network.named_parameters() if p.requires_grad]


def test_zero_lambda_removes_cross_gradients(base_pair):
    crops = make_crops()
    gradients, cross_values = [], []
    for model in (variant(base_pair, lambda1=0.0), variant(base_pair, losses=("sm", "st"))):
        loss1, _, stats = model.compute_losses(crops, 0)
        gradients.append(torch.autograd.grad(loss1, trainable(model.students[0])))
        cross_values.append(stats.get("cm1", 0.0) + stats.get("ct1", 0.0))
    assert cross_values[0] > 0 and cross_values[1] == 0  # computed in the graph, only weighted by 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*gradients))


def test_update_teachers_is_an_exact_ema_of_parameters_only(pair):
    torch.manual_seed(3)
    with torch.no_grad():
        for student in pair.students:
            for param in student.parameters():
                param.add_(torch.randn_like(param))
            for buffer in student.buffers():
                buffer.add_(1)
    old_params = [[p.clone() for p in t.parameters()] for t in pair.teachers]
    old_buffers = [[b.clone() for b in t.buffers()] for t in pair.teachers]
    pair.update_teachers(0.9)
    for student, teacher, params, buffers in zip(pair.students, pair.teachers, old_params, old_buffers):
        for s, t, old in zip(student.parameters(), teacher.parameters(), params):
            assert torch.allclose(t, 0.9 * old + 0.1 * s, rtol=0, atol=1e-6)
        assert all(torch.equal(b, old) for b, old in zip(teacher.buffers(), buffers))
        assert not any(p.requires_grad for p in teacher.parameters())


# ---------------------------------------------------------------- switches, efficiency, bookkeeping

SWITCHES = [("mokd", ("sm",)), ("mokd", ("sm", "cm")), ("mokd", ("sm", "cm", "st")), ("mokd", ALL_TERMS),
            ("independent", ALL_TERMS)]


@pytest.fixture(scope="module")
def switch_runs(base_pair):
    """One training step (forward + backward) per switch setting, all from the same weights and crops."""
    runs = {}
    for mode, losses in SWITCHES:
        model = variant(base_pair, mode=mode, losses=losses)
        thead_calls = []
        for network in (*model.students, *model.teachers):
            for module in (network.transhead, network.transhead.blocks[0]):
                module.register_forward_pre_hook(lambda *args, calls=thead_calls: calls.append(1))
        centers_before = model.centers_state_dict()
        torch.manual_seed(4)  # same drop-path masks in every run
        loss1, loss2, stats = model.compute_losses(make_crops(), 0)
        (loss1 + loss2).backward()
        runs[mode, losses] = SimpleNamespace(
            model=model, loss1=loss1.item(), loss2=loss2.item(), stats=stats, thead_calls=len(thead_calls),
            centers_before=centers_before, centers_after=model.centers_state_dict(),
            unused=any(p.grad is None for s in model.students for p in trainable(s)))
    return runs


@pytest.mark.parametrize("mode,losses", SWITCHES)
def test_term_switches(switch_runs, mode, losses):
    run = switch_runs[mode, losses]
    enabled = ("sm",) if mode == "independent" else losses
    assert run.stats.keys() == {t + n for t in enabled for n in "12"} | {"loss1", "loss2"}
    for loss, n, lam in ((run.loss1, "1", run.model.lambdas[0]), (run.loss2, "2", run.model.lambdas[1])):
        self_part = sum(run.stats.get(t + n, 0.0) for t in ("sm", "st"))
        total = self_part + lam * sum(run.stats.get(t + n, 0.0) for t in ("cm", "ct"))
        assert loss == pytest.approx(total, rel=1e-5)
    assert run.model.has_unused_parameters == run.unused
    assert run.unused == ("st" not in enabled and "ct" not in enabled)
    assert (run.thead_calls > 0) == ("st" in enabled or "ct" in enabled)


def test_independent_mode_is_dino_sm_only(switch_runs):
    independent, sm_only = switch_runs["independent", ALL_TERMS], switch_runs["mokd", ("sm",)]
    assert independent.stats == pytest.approx(sm_only.stats)
    assert independent.thead_calls == 0
    before, after = independent.centers_before, independent.centers_after
    assert after.keys() == {"sm1", "st1", "cm1", "sm2", "st2", "cm2"}  # same checkpoint layout as mokd mode
    assert all(torch.equal(after[name], before[name]) for name in ("st1", "cm1", "st2", "cm2"))
    assert not torch.equal(after["sm1"], before["sm1"])


def test_each_backbone_runs_once_per_crop_size(pair):
    calls = {"student": [], "teacher": []}
    stems = [(pair.students[0].backbone.conv1, "student"), (pair.students[1].backbone.patch_embed, "student"),
             (pair.teachers[0].backbone.conv1, "teacher"), (pair.teachers[1].backbone.patch_embed, "teacher")]
    for module, role in stems:
        module.register_forward_pre_hook(lambda m, args, role=role: calls[role].append(tuple(args[0].shape[::2])))
    wrapped = []

    class Counting(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            wrapped.append(0)
            self.slot = len(wrapped) - 1

        def forward(self, *args, **kwargs):
            wrapped[self.slot] += 1
            return self.inner(*args, **kwargs)

    pair.wrap_students(Counting)
    pair.compute_losses(make_crops(), 0)
    assert wrapped == [1, 1]
    assert sorted(calls["student"]) == sorted([(2 * B, 32), (N_LOCAL * B, 16)] * 2)
    assert calls["teacher"] == [(2 * B, 32)] * 2


def test_non_finite_term_raises_before_centers_move_and_before_its_backward(pair):
    with torch.no_grad():
        pair.students[1].head.mlp[0].weight.fill_(float("nan"))
    before = pair.centers_state_dict()
    backward_calls = []
    with pytest.raises(NonFiniteLossError) as error:
        pair.compute_losses(make_crops(), 0, backward=lambda losses: backward_calls.append(list(losses)))
    assert error.value.term == "sm2"
    assert backward_calls == [[0]]  # model 1 (finite) was back-propagated, diverged model 2 never is
    after = pair.centers_state_dict()
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_centers_state_dict_round_trip_is_strict(pair):
    state = pair.centers_state_dict()
    assert state.keys() == {"sm1", "st1", "cm1", "sm2", "st2", "cm2"}
    assert all(value.shape == (1, K) for value in state.values())
    new_state = {name: torch.randn(1, K) for name in state}
    pair.load_centers_state_dict(new_state)
    assert all(torch.equal(pair.centers_state_dict()[name], new_state[name]) for name in state)
    with pytest.raises(MokdError, match="centers"):
        renamed = {("x" if name == "cm1" else name): value for name, value in new_state.items()}
        pair.load_centers_state_dict(renamed)
    with pytest.raises(MokdError, match="centers"):
        pair.load_centers_state_dict({name: torch.zeros(1, K + 1) for name in state})


def test_param_groups_cover_trainable_parameters_once(base_pair):
    for index in (0, 1):
        student = base_pair.students[index]
        groups = base_pair.param_groups(index)
        grouped = [id(p) for group in groups for p in group["params"]]
        assert len(grouped) == len(set(grouped))
        assert set(grouped) == {id(p) for p in trainable(student)}
        part_of = {id(p): group for group in groups for p in group["params"]}
        for name, param in student.named_parameters():
            if param.requires_grad:
                group = part_of[id(param)]
                assert group["regularized"] == (param.ndim > 1)
                assert group["part"] == ("thead" if name.startswith("transhead.") else "main")
    cnn, vit = base_pair.students
    assert {id(p) for p in base_pair.last_layer_parameters(0)} == {
        id(cnn.head.last_layer.weight_v), id(cnn.transhead.last_layer.weight_g), id(cnn.transhead.last_layer.weight_v)}
    assert {id(p) for p in base_pair.last_layer_parameters(1)} == {
        id(p) for p in (*vit.head.last_layer.parameters(), *vit.transhead.last_layer.parameters())}
