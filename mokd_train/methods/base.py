"""What every non-MOKD method shares: two `PeerNetwork`s, optional EMA teachers, optional DINO
self-distillation, global-batch gathering, and the interface the engine drives (the same one `MokdPair`
offers: `compute_losses`, `update_teachers`, `param_groups`, `last_layer_parameters`, `wrap_students`,
`has_unused_parameters`, `teacher_temperatures`, centers state), plus `method_state_dict` for state
outside the networks (MCL's queues) and, for methods with their own optimisation recipe, `build_optimizer`
and `set_hyperparameters`.

Checkpoint names: `backbone.*`, `head.*` (the DINO head or DoGo's projection head) and `fc.*` (MCL's
linear head, MoCo v1's name), so `mokd-eval` reads every network with its usual loader.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as collectives
import torch.nn.functional as F
from torch import nn

from mokd.core.errors import MokdError
from mokd.core.registry import ArchSpec, build_backbone, forward_tokens
from mokd_train.heads import MLPHead
from mokd_train.losses import Centers, batch_center, distillation_loss
from mokd_train.pair import ema_update, finite_values, frozen_copy_without_drop_path
from mokd.core.schedules import teacher_temperature_schedule

if TYPE_CHECKING:
    from mokd_train.config import TrainConfig

SGD_MOMENTUM = 0.9


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _interleave(parts: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Rank r's row i is global sample i·W + r (EpochShardSampler): restore the one-process order."""
    return torch.stack(list(parts), dim=1).flatten(0, 1)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The global batch of `x` in one-process order; gradients flow back to every rank's rows.

    The backward of the collective sums over ranks the gradient each rank's (identical) global loss
    sends to a row, i.e. W times the gradient; DDP's average over ranks divides it back, so the
    update equals one process's on the whole batch.
    """
    if world_size() == 1:
        return x
    gathered = collectives.all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)
    return _interleave(gathered.chunk(world_size()))


@torch.no_grad()
def gather_without_grad(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return _interleave(parts)


class PeerNetwork(nn.Module):
    """A backbone with the heads a method needs: `head` (DINO's MLP-Head or DoGo's projection head)
    and/or `fc` (MCL's 128-d linear head)."""

    def __init__(self, spec: ArchSpec, backbone: nn.Module, head: nn.Module | None = None,
                 fc: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.head = head
        self.fc = fc

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled vector (ResNet) or CLS token after the final norm (ViT): what evaluation reads too."""
        return forward_tokens(self.backbone, self.spec, images)[0]

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None,
                outputs: frozenset[str]) -> dict[str, torch.Tensor]:
        """Named outputs in one call (one DDP forward per backward).

        "dino": MLP-Head logits of the globals then the locals; "bottleneck": the MLP-Head's L2-normalised
        bottleneck of the globals; "proj": the projection head of the globals; "q": the L2-normalised
        linear head of the globals (the caller keeps the query crop's rows).
        """
        pooled = self.pooled(global_crops)
        result: dict[str, torch.Tensor] = {}
        if "dino" in outputs or "bottleneck" in outputs:
            bottleneck = F.normalize(self.head.mlp(pooled), dim=-1)
            if "bottleneck" in outputs:
                result["bottleneck"] = bottleneck
            if "dino" in outputs:
                logits = [self.head.last_layer(bottleneck)]
                if local_crops is not None:
                    logits.append(self.head(self.pooled(local_crops)))
                result["dino"] = torch.cat(logits)
        if "proj" in outputs:
            result["proj"] = F.normalize(self.head(pooled), dim=-1)
        if "q" in outputs:
            result["q"] = F.normalize(self.fc(pooled), dim=-1)
        return result


class PeerPair(nn.Module):
    """Two networks trained by one method; subclasses define the networks and the loss terms.

    `cfg.mode == "independent"` is the method's own single-model baseline: each model with its self term
    only, nothing crossing models. With `dino` (the adapted methods) each model also keeps DINO's
    self-distillation `sm` (EMA teacher, center, multi-crop), exactly MOKD's term.
    """

    uses_teachers: bool = False
    own_recipe: bool = False  # True: the method's optimizer and lr schedule, not MOKD's

    def __init__(self, specs: tuple[ArchSpec, ArchSpec], cfg: TrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.specs = specs
        self.method = cfg.method
        self.dino = cfg.method.startswith("dino+")
        self.interactive = cfg.mode != "independent"
        self.lambdas = (float(cfg.lambda1), float(cfg.lambda2))
        self.students = nn.ModuleList(
            self.build_network(spec, drop_path_rate=cfg.drop_path if spec.is_vit else 0.0) for spec in specs)
        teachers = [frozen_copy_without_drop_path(s) for s in self.students] if self.uses_teachers else []
        self.teachers = nn.ModuleList(teachers)
        self._forwards: list[Callable[..., dict[str, torch.Tensor]]] = list(self.students)
        if self.dino:
            self.centers = Centers(["sm1", "sm2"], cfg.out_dim, 0.9)
            shared = teacher_temperature_schedule(cfg.warmup_teacher_temp, cfg.teacher_temp,
                                                  cfg.warmup_teacher_temp_epochs, cfg.epochs)
            cnn = shared if cfg.paper_temperature else teacher_temperature_schedule(
                cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.cnn_self_warmup_teacher_temp_epochs, cfg.epochs)
            self._self_temps = tuple(shared if spec.is_vit else cnn for spec in specs)

    # -- to implement --

    def build_network(self, spec: ArchSpec, *, drop_path_rate: float) -> PeerNetwork:
        """A randomly initialised student of this method."""
        raise NotImplementedError

    def _terms(self, crops: list[torch.Tensor], epoch: int) -> tuple[list[dict[str, torch.Tensor]],
                                                                     list[torch.Tensor]]:
        """(per-model term dicts, per-model totals) of one step; self terms first in each dict."""
        raise NotImplementedError

    def _after_step(self) -> None:
        """State updates that must wait until every term is known finite (centers, queues)."""

    # -- shared pieces --

    def dino_head(self, spec: ArchSpec) -> MLPHead:
        return MLPHead(spec.feature_dim, self.cfg.out_dim, self.cfg.mlp_hidden_dim, self.cfg.mlp_bottleneck_dim,
                       norm_last_layer=not spec.is_vit)

    def new_backbone(self, spec: ArchSpec, drop_path_rate: float) -> nn.Module:
        return build_backbone(spec, drop_path_rate=drop_path_rate)

    def student_outputs(self, index: int, global_crops: torch.Tensor, local_crops: torch.Tensor | None,
                        outputs: frozenset[str]) -> dict[str, torch.Tensor]:
        return self._forwards[index](global_crops, local_crops, outputs=outputs)

    def dino_term(self, index: int, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  epoch: int) -> torch.Tensor:
        """MOKD's / DINO's `sm` for model `index`; its batch center is applied in `_after_step`."""
        name = f"sm{index + 1}"
        self._pending_centers[name] = batch_center(teacher_logits)
        return distillation_loss(student_logits, teacher_logits, self.centers[name],
                                 float(self._self_temps[index][epoch]), 0.1)

    def compute_losses(self, crops: list[torch.Tensor], epoch: int,
                       backward: Callable[[dict[int, torch.Tensor]], None] | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """`(L1, L2, stats)`; raises NonFiniteLossError before any state moves (and before `backward`) if a
        term diverged.

        `backward`, when given, is called once with both losses: the peer terms read the other *student's*
        outputs, so both students run before either loss exists (MOKD's cross terms read only teachers)."""
        if len(crops) != 2 + self.cfg.n_local:
            raise ValueError(f"expected 2 global + {self.cfg.n_local} local crops, got {len(crops)} crops")
        self._pending_centers: dict[str, torch.Tensor] = {}
        terms, totals = self._terms(crops, epoch)
        named = {f"{name}{index + 1}": value for index in (0, 1) for name, value in terms[index].items()}
        stats = finite_values({**named, "loss1": totals[0], "loss2": totals[1]})
        if backward is not None:
            backward({0: totals[0], 1: totals[1]})
        if self.dino:
            self.centers.update(self._pending_centers)
        self._after_step()
        return totals[0], totals[1], stats

    # -- the engine's interface --

    @property
    def has_unused_parameters(self) -> bool:
        return False

    @property
    def eval_keys(self) -> tuple[str, str]:
        """Networks `mokd-eval` evaluates by default: the online networks (DoGo, MoCo's query encoders)."""
        return ("student1", "student2")

    def wrap_students(self, wrapper: Callable[[nn.Module], nn.Module]) -> None:
        self._forwards = [wrapper(student) for student in self.students]

    def teacher_temperatures(self, epoch: int) -> dict[str, float]:
        if not self.dino:
            return {}
        return {f"sm{i + 1}": float(self._self_temps[i][epoch]) for i in (0, 1)}

    def update_teachers(self, momentum: float) -> None:
        ema_update(self.students, self.teachers, momentum)

    def param_groups(self, index: int) -> list[dict]:
        """Weights (regularized) and biases/norms (ndim <= 1) of student `index`, all in part "main"."""
        buckets: dict[bool, list[nn.Parameter]] = {True: [], False: []}
        for param in self.students[index].parameters():
            if param.requires_grad:
                buckets[param.ndim > 1].append(param)
        return [{"params": params, "name": f"main_{'regularized' if regularized else 'unregularized'}",
                 "regularized": regularized, "part": "main"} for regularized, params in buckets.items() if params]

    def last_layer_parameters(self, index: int) -> list[nn.Parameter]:
        if not self.dino:
            return []
        return [param for param in self.students[index].head.last_layer.parameters() if param.requires_grad]

    def centers_state_dict(self) -> dict[str, torch.Tensor]:
        if not self.dino:
            return {}
        return {name: center.detach().clone() for name, center in self.centers.named_buffers()}

    def load_centers_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.centers_state_dict())
        if set(state) != expected:
            raise MokdError(f"checkpoint centers {sorted(state)} do not match the {self.method} method's "
                            f"{sorted(expected)}: resume with the same --method")
        if expected:
            self.centers.load_state_dict(state)

    def method_state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_method_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise MokdError(f"checkpoint holds method state {sorted(state)} the {self.method} method does not have")

    # -- the method's own optimisation recipe (own_recipe = True) --

    def build_optimizer(self, index: int) -> torch.optim.Optimizer:
        raise NotImplementedError

    def learning_rate(self, iteration: int, steps_per_epoch: int) -> float:
        raise NotImplementedError

    def set_hyperparameters(self, optimizers: list[torch.optim.Optimizer], iteration: int,
                            steps_per_epoch: int) -> None:
        lr = self.learning_rate(iteration, steps_per_epoch)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
