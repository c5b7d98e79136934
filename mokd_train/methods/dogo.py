"""DoGo (Distill on the Go, CVPRW 2021) and the adapted `dino+dogo`.

Faithful `dogo`: two online networks (no EMA teacher), each a backbone with DoGo's projection head,
trained with SimCLR's NT-Xent (τ = 0.5) on its own two views plus λ_m·KL(P_peer.detach ‖ P_m) of the
view-1-vs-view-2 relation matrices (τ_KL = 0.1, ÷B²); Adam, constant lr. Both views of the batch go
through the network in one call (so DDP sees one forward), i.e. the head's batch norm sees both views.

Adapted `dino+dogo`: each model keeps DINO's self-distillation (`sm`, MOKD's recipe) and adds the
relation KL on its DINO head's L2-normalised bottleneck (256-d) of the two global crops. Not a
published method: labelled as an adaptation wherever it appears.

Under DDP both losses depend on the whole batch: embeddings are gathered with gradient, so W processes
compute exactly what one process computes on the global batch.
"""

from __future__ import annotations

import torch
from torch import nn

from mokd.core.registry import ArchSpec
from mokd_train.methods.base import PeerNetwork, PeerPair, gather_with_grad
from mokd_train.methods.losses import nt_xent, relation_kl, relation_log_probs

HIDDEN_DIM = 512
PROJECTION_DIM = 128
LR = 3e-4
WEIGHT_DECAY = 1e-6


class DogoHead(nn.Module):
    """Linear(d→512, no bias) → BN → ReLU → Linear(512→128); the caller L2-normalises.

    The batch norm is a BatchNorm2d over B×512×1×1 (the same arithmetic as BatchNorm1d on B×512) so that
    the trainer's cross-rank batch-norm synchronisation, written for BatchNorm2d, covers it under DDP.
    """

    def __init__(self, in_dim: int, hidden_dim: int = HIDDEN_DIM, out_dim: int = PROJECTION_DIM) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim, bias=False)
        self.bn = nn.BatchNorm2d(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.bn(self.fc1(x)[:, :, None, None]).flatten(1)
        return self.fc2(torch.relu(hidden))


class DogoPair(PeerPair):
    """`dogo` and `dino+dogo` (see the module docstring)."""

    def __init__(self, specs: tuple[ArchSpec, ArchSpec], cfg) -> None:
        self.uses_teachers = cfg.method.startswith("dino+")
        self.own_recipe = not self.uses_teachers
        super().__init__(specs, cfg)

    def build_network(self, spec: ArchSpec, *, drop_path_rate: float) -> PeerNetwork:
        head = self.dino_head(spec) if self.dino else DogoHead(spec.feature_dim)
        return PeerNetwork(spec, self.new_backbone(spec, drop_path_rate), head=head)

    def _terms(self, crops, epoch):
        batch = crops[0].shape[0]
        global_crops = torch.cat(crops[:2])
        local_crops = torch.cat(crops[2:]) if len(crops) > 2 else None
        if self.dino:
            wanted = frozenset({"dino", "bottleneck"} if self.interactive else {"dino"})
            embedding = "bottleneck"
        else:
            wanted, embedding = frozenset({"proj"}), "proj"
        outputs = [self.student_outputs(i, global_crops, local_crops, wanted) for i in (0, 1)]
        terms: list[dict[str, torch.Tensor]] = [{}, {}]
        if self.dino:
            for i in (0, 1):
                with torch.no_grad():
                    teacher = self.teachers[i]
                    teacher_logits = teacher.head(teacher.pooled(global_crops))
                terms[i]["sm"] = self.dino_term(i, outputs[i]["dino"], teacher_logits, epoch)
        views = [(gather_with_grad(out[embedding][:batch]), gather_with_grad(out[embedding][batch:]))
                 for out in outputs] if (self.interactive or not self.dino) else []
        if not self.dino:
            for i in (0, 1):
                terms[i]["ntx"] = nt_xent(*views[i])
        totals = [terms[i]["sm" if self.dino else "ntx"] for i in (0, 1)]
        if self.interactive:
            relations = [relation_log_probs(*view) for view in views]
            for i in (0, 1):
                terms[i]["kl"] = relation_kl(relations[i], relations[1 - i])
                totals[i] = totals[i] + self.lambdas[i] * terms[i]["kl"]
        return terms, totals

    def build_optimizer(self, index: int) -> torch.optim.Optimizer:
        """Adam with L2 weight decay on every parameter (DoGo's recipe); the lr is constant."""
        lr = self.cfg.peer_lr if self.cfg.peer_lr is not None else LR
        decay = self.cfg.peer_weight_decay if self.cfg.peer_weight_decay is not None else WEIGHT_DECAY
        groups = [{**group, "weight_decay": decay} for group in self.param_groups(index)]
        return torch.optim.Adam(groups, lr=lr)

    def learning_rate(self, iteration: int, steps_per_epoch: int) -> float:
        return self.cfg.peer_lr if self.cfg.peer_lr is not None else LR
