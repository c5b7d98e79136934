"""MCL (Mutual Contrastive Learning, AAAI 2022, self-supervised on MoCo v1) and the adapted `dino+mcl`.

Faithful `mcl`: each network is a MoCo v1 query encoder (backbone + 128-d linear `fc`) with its EMA key
encoder (the "teacher", momentum `momentum_teacher` = 0.999, held constant by the engine's schedule) and its own queue of K keys. Both
networks see the same query crop (global crop 1) and key crop (global crop 2). With ℓ_ii = [q_i·k_i, q_i·Q_i]/T
and ℓ_ij = [q_i·k_j, q_i·Q_j]/T (T = 0.07): L_i = CE(ℓ_ii) + λ_i·(KD₃(ℓ_ii ‖ sg ℓ_jj) + CE(ℓ_ij) + KD₃(ℓ_ij ‖ sg ℓ_ji)),
λ = 1 by default. After the step both queues receive their network's keys at the same pointer (lock-step),
so once full their columns hold the same images. SGD 0.03, momentum 0.9, wd 1e-4, lr ×0.1 at 60% and 80%
of the epochs (120 and 160 of 200). `--mode independent` is MoCo v1 on each model: CE(ℓ_ii) only.
MoCo's shuffled batch norm is not reproduced: under DDP the key encoders' batch norms are synchronised.

Adapted `dino+mcl`: DINO's self-distillation (`sm`, MOKD's recipe and EMA schedule) on each model, plus
MCL's three cross terms (kdv, icl, kdi) computed with an extra 128-d `fc` head on the student and its EMA
teacher as key encoder. Not a published method: labelled as an adaptation wherever it appears.

All losses are per-sample means, so DDP needs no gathering except for the keys entering the queues.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mokd.core.errors import MokdError
from mokd.core.registry import ArchSpec
from mokd_train.methods.base import SGD_MOMENTUM, PeerNetwork, PeerPair, gather_without_grad
from mokd_train.methods.losses import contrastive_logits, mcl_terms

PROJECTION_DIM = 128
LR = 0.03
WEIGHT_DECAY = 1e-4
LR_DECAY = 0.1
CROSS_TERMS = ("kdv", "icl", "kdi")


class MclPair(PeerPair):
    """`mcl` and `dino+mcl` (see the module docstring)."""

    uses_teachers = True

    def __init__(self, specs: tuple[ArchSpec, ArchSpec], cfg) -> None:
        self.own_recipe = not cfg.method.startswith("dino+")
        super().__init__(specs, cfg)
        if cfg.queue_size % cfg.batch_size:
            raise MokdError(f"queue_size {cfg.queue_size} must be a multiple of the global batch size "
                            f"{cfg.batch_size} (keys enter the queue one batch at a time): change either")
        for index in (1, 2):
            self.register_buffer(f"queue{index}", F.normalize(torch.randn(cfg.queue_size, PROJECTION_DIM), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def build_network(self, spec: ArchSpec, *, drop_path_rate: float) -> PeerNetwork:
        head = self.dino_head(spec) if self.dino else None
        return PeerNetwork(spec, self.new_backbone(spec, drop_path_rate), head=head,
                           fc=nn.Linear(spec.feature_dim, PROJECTION_DIM))

    @property
    def queues(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.queue1, self.queue2

    @property
    def has_unused_parameters(self) -> bool:
        return self.dino and not self.interactive  # the fc head of an independent DINO run gets no gradient

    def _terms(self, crops, epoch):
        batch = crops[0].shape[0]
        if self.dino:
            global_crops = torch.cat(crops[:2])
            local_crops = torch.cat(crops[2:]) if len(crops) > 2 else None
            wanted = frozenset({"dino", "q"} if self.interactive else {"dino"})
        else:
            global_crops, local_crops, wanted = crops[0], None, frozenset({"q"})
        outputs = [self.student_outputs(i, global_crops, local_crops, wanted) for i in (0, 1)]
        queries = [output["q"][:batch] for output in outputs if "q" in output]
        keys, terms = [], [{}, {}]
        for i, teacher in enumerate(self.teachers):
            with torch.no_grad():
                pooled = teacher.pooled(global_crops if self.dino else crops[1])
                keys.append(F.normalize(teacher.fc(pooled[batch:] if self.dino else pooled), dim=-1))
                teacher_logits = teacher.head(pooled) if self.dino else None
            if self.dino:
                terms[i]["sm"] = self.dino_term(i, outputs[i]["dino"], teacher_logits, epoch)
        self._keys = keys
        if self.dino and not self.interactive:
            return terms, [terms[i]["sm"] for i in (0, 1)]
        queues = self.queues
        within = [contrastive_logits(queries[i], keys[i], queues[i]) for i in (0, 1)]
        across = [contrastive_logits(queries[i], keys[1 - i], queues[1 - i]) for i in (0, 1)]
        totals = []
        for i in (0, 1):
            mcl = mcl_terms(within[i], across[i], within[1 - i], across[1 - i], interactive=self.interactive)
            if self.dino:
                mcl.pop("vcl")
            terms[i].update(mcl)
            cross = sum(mcl[name] for name in CROSS_TERMS if name in mcl)
            own = terms[i]["sm"] if self.dino else mcl["vcl"]
            totals.append(own + self.lambdas[i] * cross if self.interactive else own)
        return terms, totals

    @torch.no_grad()
    def _after_step(self) -> None:
        """Both queues take their network's keys of the global batch at the same pointer."""
        if self.dino and not self.interactive:
            return
        pointer, size = int(self.queue_ptr), self.cfg.batch_size
        for queue, keys in zip(self.queues, self._keys):
            queue[pointer:pointer + size] = gather_without_grad(keys).to(queue.dtype)
        self.queue_ptr.fill_((pointer + size) % self.cfg.queue_size)

    def method_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: buffer.detach().clone() for name, buffer in
                (("queue1", self.queue1), ("queue2", self.queue2), ("queue_ptr", self.queue_ptr))}

    def load_method_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.method_state_dict()
        found = {name: tuple(value.shape) for name, value in state.items()}
        if found != {name: tuple(value.shape) for name, value in expected.items()}:
            raise MokdError(f"checkpoint queues {found} do not match this configuration's queue_size "
                            f"{self.cfg.queue_size}: resume with the same settings")
        for name, value in state.items():
            getattr(self, name).copy_(value)

    def build_optimizer(self, index: int) -> torch.optim.Optimizer:
        """SGD with momentum and L2 weight decay on every parameter (MoCo v1's recipe)."""
        decay = self.cfg.peer_weight_decay if self.cfg.peer_weight_decay is not None else WEIGHT_DECAY
        groups = [{**group, "weight_decay": decay} for group in self.param_groups(index)]
        return torch.optim.SGD(groups, lr=self.learning_rate(0, 1), momentum=SGD_MOMENTUM)

    def learning_rate(self, iteration: int, steps_per_epoch: int) -> float:
        """Step schedule: ×0.1 at each milestone (a fraction of the epochs, rounded to an epoch)."""
        base = self.cfg.peer_lr if self.cfg.peer_lr is not None else LR
        epoch = iteration // steps_per_epoch
        passed = sum(epoch >= round(fraction * self.cfg.epochs) for fraction in self.cfg.lr_milestones)
        return base * LR_DECAY ** passed
