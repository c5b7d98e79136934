"""The two MOKD models (students + EMA teachers) and the 8 loss terms of one training step.

T-Head width rule: D = `thead_dim` if set, else the largest ViT embed dim in the pair, else 384 (CNN-CNN
pairs, the official ViT-S width); heads = `thead_heads` if set, else 6 when D divides by 6 (the official
count), else D // 64. Position grids (the ViT backbone's and both T-Heads') are built for the spec's img_size
(the run's `position_size`, by default its global crop size): T-Head grid CNN img_size // 32 (ImageNet stem) or
// 8 (CIFAR stem), ViT img_size // patch_size. They stay at that size and are resized at every forward for crops
of any other size, as the official code does with its 224 px grids (ViT 14x14, T-Heads 14x14 / 7x7).

Search query of model i into model j's teacher T-Head (always detached): a CNN student's `x_pool` (mean of
its own 1×1-projected local-crop map), a ViT student's CLS token (through its own T-Head `input_proj` when
its width differs from D).

Efficiency: each student backbone runs once on the stacked globals and once on the stacked locals (a single
forward call per student, so DDP sees one forward per backward), and each T-Head's last layer once for both
crop sizes; each teacher runs once on the globals, under no_grad, and its T-Head tokens of global crop 1
(index 0) are reused for the search. The engine back-propagates each model's loss before the other student
runs (`compute_losses(backward=...)`), so the pair's activation peak is one model's, not the sum.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from timm.layers import DropPath
from torch import nn

from mokd.core.errors import MokdError
from mokd.core.registry import ArchSpec, build_backbone, forward_tokens
from mokd.core.validation import resnet_stride
from mokd_train.heads import MLPHead, THead
from mokd_train.losses import (
    Centers,
    CrossObjective,
    ModelStep,
    MokdCrossObjective,
    NonFiniteLossError,
    batch_center,
    distillation_loss,
)
from mokd_train.monitor import mean_pairwise_cosine, target_entropy
from mokd.core.schedules import teacher_temperature_schedule

MODES = ("mokd", "independent")
SELF_TERMS = ("sm", "st")
TERMS = SELF_TERMS + MokdCrossObjective.terms
DEFAULT_THEAD_DIM = 384
# ModelStep fields each self term reads (the cross objective declares its own).
SELF_TERM_OUTPUTS = {
    "sm": frozenset({"student_mlp", "teacher_mlp"}),
    "st": frozenset({"student_thead_global", "student_thead_local", "teacher_thead"}),
}
# Network.forward outputs, named as ModelStep's student fields without the prefix.
STUDENT_OUTPUTS = ("mlp", "thead_global", "thead_local", "query")


@dataclass
class PairConfig:
    out_dim: int = 65536
    mlp_hidden_dim: int = 2048
    mlp_bottleneck_dim: int = 256
    mlp_bn: bool = False
    thead_depth: int = 3
    thead_l2norm: bool = False
    thead_dim: int | None = None
    thead_heads: int | None = None
    mode: str = "mokd"  # "mokd" | "independent" (each model alone with Lsm only: DINO)
    losses: tuple[str, ...] = ("sm", "st", "cm", "ct")  # term switches in mokd mode
    lambda1: float = 1.0
    lambda2: float = 0.1
    n_local: int = 8
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    cnn_self_warmup_epochs: int | None = 50  # official code quirk; None -> the paper's single warm-up
    epochs: int = 100
    center_momentum: float = 0.9
    vit_drop_path: float = 0.1  # students only; teachers use 0

    def __post_init__(self) -> None:
        self.losses = tuple(self.losses)
        if self.mode not in MODES:
            raise MokdError(f"unknown training mode {self.mode!r}: use one of {', '.join(MODES)}")
        unknown = sorted(set(self.losses) - set(TERMS))
        if unknown or not self.losses:
            raise MokdError(f"loss terms {list(self.losses)} are invalid: choose a non-empty subset of "
                            f"{', '.join(TERMS)}")
        if self.n_local < 0:
            raise MokdError(f"n_local is {self.n_local}: the number of local crops cannot be negative")
        if self.mode == "mokd" and "ct" in self.losses and self.n_local == 0:
            raise MokdError("the search term 'ct' needs local crops: set n_local >= 1 or drop 'ct' from the losses")

    @property
    def enabled_terms(self) -> tuple[str, ...]:
        """Terms each model computes, in the order sm, st, cm, ct."""
        if self.mode == "independent":
            return ("sm",)
        return tuple(term for term in TERMS if term in self.losses)


def thead_width(spec1: ArchSpec, spec2: ArchSpec, cfg: PairConfig) -> tuple[int, int]:
    """`(D, heads)` of both models' T-Heads, by the rule in the module docstring."""
    vit_dims = [spec.embed_dim for spec in (spec1, spec2) if spec.is_vit]
    dim = cfg.thead_dim or (max(vit_dims) if vit_dims else DEFAULT_THEAD_DIM)
    heads = cfg.thead_heads or (6 if dim % 6 == 0 else dim // 64)
    if heads < 1 or dim % heads:
        raise MokdError(f"T-Head width {dim} cannot be split into {heads} attention heads: "
                        f"set thead_heads to a divisor of thead_dim")
    return dim, heads


def feature_stride(spec: ArchSpec) -> int:
    """Pixels per cell of the backbone's local-feature grid: the ViT's patch, the ResNet's output stride."""
    return spec.patch_size if spec.is_vit else resnet_stride(spec)


def thead_grid(spec: ArchSpec) -> int:
    """Side of the T-Head's stored position grid: the feature grid of a `spec.img_size` image."""
    return spec.img_size // feature_stride(spec)


class Network(nn.Module):
    """One MOKD network (a student or a teacher): backbone, MLP-Head (`head`) and T-Head (`transhead`)."""

    def __init__(self, spec: ArchSpec, backbone: nn.Module, head: MLPHead, transhead: THead) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.head = head
        self.transhead = transhead

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(pooled vector or CLS token B×C, local features as a B×C×h×w map)`."""
        pooled, local = forward_tokens(self.backbone, self.spec, images)
        if self.spec.is_vit:
            height, width = (size // self.spec.patch_size for size in images.shape[-2:])
            local = local.transpose(1, 2).reshape(local.shape[0], local.shape[2], height, width)
        return pooled, local

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None,
                outputs: frozenset[str]) -> dict[str, torch.Tensor]:
        """The student outputs named in `outputs` (a subset of STUDENT_OUTPUTS), all crops in one call.

        "mlp": MLP-Head logits of globals then locals; "thead_global"/"thead_local": T-Head logits
        without query; "query": detached search queries of the local crops. "features" (the detached
        global-crop backbone features, for the collapse monitor) comes whenever the globals were run.
        """
        result: dict[str, torch.Tensor] = {}
        pooled = []
        thead_pooled = {}  # T-Head encodings before the last layer, which then runs once for both crop sizes
        if outputs & {"mlp", "thead_global"}:
            global_pooled, global_map = self.features(global_crops)
            pooled.append(global_pooled)
            result["features"] = global_pooled.detach()
            if "thead_global" in outputs:
                thead_pooled["thead_global"] = self.transhead.pooled(self.transhead.tokens(global_map)[0])
        if local_crops is not None and outputs & {"mlp", "thead_local", "query"}:
            local_pooled, local_map = self.features(local_crops)
            pooled.append(local_pooled)
            if outputs & {"thead_local", "query"}:
                tokens, projected_mean = self.transhead.tokens(local_map)
                if "thead_local" in outputs:
                    thead_pooled["thead_local"] = self.transhead.pooled(tokens)
                if "query" in outputs:
                    query = self.transhead.project(local_pooled) if self.spec.is_vit else projected_mean
                    result["query"] = query.detach()
        if thead_pooled:
            logits = self.transhead.last_layer(torch.cat(list(thead_pooled.values())))
            sizes = [encoded.shape[0] for encoded in thead_pooled.values()]
            result.update(zip(thead_pooled, logits.split(sizes)))
        if "mlp" in outputs:
            result["mlp"] = self.head(torch.cat(pooled))
        return result


def build_network(spec: ArchSpec, cfg: PairConfig, thead_dim: int, thead_heads: int, *,
                  drop_path_rate: float) -> Network:
    """A randomly initialised network; the MLP-Head's weight_g is frozen for CNNs (official choice)."""
    head = MLPHead(spec.feature_dim, cfg.out_dim, cfg.mlp_hidden_dim, cfg.mlp_bottleneck_dim,
                   norm_last_layer=not spec.is_vit, use_bn=cfg.mlp_bn)
    transhead = THead(spec.feature_dim, thead_dim, cfg.out_dim, thead_grid(spec), conv_input=not spec.is_vit,
                      depth=cfg.thead_depth, num_heads=thead_heads, l2_normalize=cfg.thead_l2norm)
    return Network(spec, build_backbone(spec, drop_path_rate=drop_path_rate), head, transhead)


def frozen_copy_without_drop_path(student: Network) -> Network:
    """The teacher: an exact copy of the student, stochastic depth off, excluded from autograd."""
    teacher = copy.deepcopy(student)
    for module in teacher.modules():
        if isinstance(module, DropPath):
            module.drop_prob = 0.0
    return teacher.requires_grad_(False)


@torch.no_grad()
def ema_update(students: Sequence[nn.Module], teachers: Sequence[nn.Module], momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student for every parameter; BN statistics are not averaged."""
    for student, teacher in zip(students, teachers):
        student_params, teacher_params = list(student.parameters()), list(teacher.parameters())
        if len(student_params) != len(teacher_params):
            raise ValueError(f"student has {len(student_params)} parameters, teacher {len(teacher_params)}")
        # lerp: teacher + (1 - m) * (student - teacher), one pass per tensor, all tensors in one call
        torch._foreach_lerp_(teacher_params, [param.detach() for param in student_params], 1 - momentum)


def non_finite_everywhere(values: torch.Tensor) -> int | None:
    """Index of the first non-finite value on any process (the same answer on every rank), else None.

    Under DDP the flags are all-reduced before anyone raises: a rank that stopped alone would leave the
    others waiting in the next collective; with the shared flag every rank stops in the same step with
    the same message.
    """
    flags = (~torch.isfinite(values)).to(torch.float32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags)
    failed = torch.nonzero(flags).flatten().tolist()
    return failed[0] if failed else None


def finite_values(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """The terms' values, after checking on every rank that all are finite (NonFiniteLossError names the
    first that is not, on every rank alike)."""
    names = list(terms)
    stacked = torch.stack([terms[name].detach().float() for name in names])
    failed = non_finite_everywhere(stacked)
    if failed is not None:
        raise NonFiniteLossError(names[failed])
    return dict(zip(names, stacked.tolist()))


class MokdPair(nn.Module):
    """Two students, their EMA teachers, the centers, and the per-step loss computation."""

    def __init__(self, spec1: ArchSpec, spec2: ArchSpec, cfg: PairConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.specs = (spec1, spec2)
        self.cross: CrossObjective = MokdCrossObjective()
        dim, heads = thead_width(spec1, spec2, cfg)
        self.students = nn.ModuleList(
            build_network(spec, cfg, dim, heads, drop_path_rate=cfg.vit_drop_path if spec.is_vit else 0.0)
            for spec in self.specs)
        self.teachers = nn.ModuleList(frozen_copy_without_drop_path(student) for student in self.students)
        self._student_forwards: list[Callable[..., dict[str, torch.Tensor]]] = list(self.students)

        self.enabled = frozenset(cfg.enabled_terms)
        centered = SELF_TERMS + self.cross.centered_terms
        self.centers = Centers([f"{term}{i}" for i in (1, 2) for term in centered], cfg.out_dim, cfg.center_momentum)
        self._needed = self.cross.required_outputs(self.enabled & set(self.cross.terms)).union(
            *(SELF_TERM_OUTPUTS[term] for term in self.enabled & set(SELF_TERMS)))
        self._student_outputs = frozenset(name for name in STUDENT_OUTPUTS if f"student_{name}" in self._needed)

        shared = teacher_temperature_schedule(cfg.warmup_teacher_temp, cfg.teacher_temp,
                                              cfg.warmup_teacher_temp_epochs, cfg.epochs)
        cnn_self = shared if cfg.cnn_self_warmup_epochs is None else teacher_temperature_schedule(
            cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.cnn_self_warmup_epochs, cfg.epochs)
        self._cross_temps = shared
        self.monitor: dict[str, float] = {}  # collapse-monitor values of the last step (sm terms only)
        self._self_temps = tuple(shared if spec.is_vit else cnn_self for spec in self.specs)

    @property
    def lambdas(self) -> tuple[float, float]:
        return self.cfg.lambda1, self.cfg.lambda2

    @property
    def has_unused_parameters(self) -> bool:
        """True when some trainable student parameters get no gradient (a head no enabled term uses):
        DDP then needs find_unused_parameters=True."""
        uses_mlp_head = "mlp" in self._student_outputs
        uses_thead = bool(self._student_outputs & {"thead_global", "thead_local"})
        return not (uses_mlp_head and uses_thead)

    def wrap_students(self, wrapper: Callable[[nn.Module], nn.Module]) -> None:
        """Route student forwards through `wrapper(student)` (e.g. DDP); state and EMA keep the raw modules."""
        self._student_forwards = [wrapper(student) for student in self.students]

    def teacher_temperatures(self, epoch: int) -> dict[str, float]:
        """τt of each term of each model at `epoch`, keyed like the loss terms ("sm1", ..., "ct2")."""
        temps = {}
        for i in (0, 1):
            self_temp, cross_temp = self._temperatures(i, epoch)
            temps.update({f"{term}{i + 1}": self_temp for term in SELF_TERMS})
            temps.update({f"{term}{i + 1}": cross_temp for term in self.cross.terms})
        return temps

    def _temperatures(self, index: int, epoch: int) -> tuple[float, float]:
        """`(self-term τt, cross-term τt)` of model `index`."""
        return float(self._self_temps[index][epoch]), float(self._cross_temps[epoch])

    def compute_losses(self, crops: list[torch.Tensor], epoch: int,
                       backward: Callable[[dict[int, torch.Tensor]], None] | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """`(L1, L2, stats)` for one batch of crops: 2 globals then `n_local` locals, each B×3×H×W.

        L_i = sm_i + st_i + λ_i·(cross terms of model i), only enabled terms. Both teachers run first; then,
        one model at a time, its student, the peer teacher's search with its queries, and its loss. Each
        model's terms are checked to be finite on every rank (NonFiniteLossError) as soon as they exist. With
        `backward`, `backward({i: L_i})` is then called at once, before the other student runs: only one
        student's graph is ever alive (peak memory holds one model's activations, not both), and the gradients
        equal those of backward(L1 + L2) because no term of L_i reads the other *student*, only its teacher.
        For the same reason the caller may step model i's optimizer inside `backward` (the engine does, so
        model 1's gradients are freed before model 2's exist): L2 does not change. Centers move only after
        both losses are computed and finite.
        """
        if len(crops) != 2 + self.cfg.n_local:
            raise ValueError(f"expected 2 global + {self.cfg.n_local} local crops, got {len(crops)} crops")
        global_crops = torch.cat(crops[:2])
        local_crops = torch.cat(crops[2:]) if self.cfg.n_local else None
        steps = [ModelStep(), ModelStep()]
        search_tokens = [self._teacher_step(i, global_crops, steps[i]) for i in (0, 1)]

        values: dict[str, float] = {}
        monitor: dict[str, float] = {}
        batch_centers: dict[str, torch.Tensor] = {}
        totals = []
        for i in (0, 1):
            own, peer, suffix = steps[i], steps[1 - i], str(i + 1)
            self._student_step(i, global_crops, local_crops, own)
            if search_tokens[1 - i] is not None:
                peer.teacher_search = self._search(1 - i, search_tokens[1 - i], own.student_query)
            self_temp, cross_temp = self._temperatures(i, epoch)
            self_losses, self_centers = self._self_terms(own, suffix, self_temp)
            cross_losses, cross_centers = self.cross(
                own, peer, self.enabled & set(self.cross.terms),
                {term: self.centers[term + suffix] for term in self.cross.centered_terms},
                cross_temp, self.cfg.student_temp)
            if "sm" in self_losses:
                monitor.update(self._monitor(own, suffix, self_temp, self_losses["sm"]))
            totals.append(sum(self_losses.values()) + self.lambdas[i] * sum(cross_losses.values()))
            terms = {name + suffix: loss for name, loss in {**self_losses, **cross_losses}.items()}
            values.update(finite_values({**terms, "loss" + suffix: totals[i]}))
            batch_centers.update({name + suffix: c for name, c in {**self_centers, **cross_centers}.items()})
            if backward is not None:
                backward({i: totals[i]})

        names = [name for term in self.cfg.enabled_terms for name in (term + "1", term + "2")]
        self.centers.update(batch_centers)
        self.monitor = monitor
        stats = {name: values[name] for name in names + ["loss1", "loss2"]}
        return totals[0], totals[1], stats

    def _monitor(self, step: ModelStep, suffix: str, teacher_temp: float, sm: torch.Tensor) -> dict[str, float]:
        """Collapse-monitor values of one model's sm term (see `mokd_train.monitor`), before the center update."""
        entropy = target_entropy(step.teacher_mlp, self.centers["sm" + suffix], teacher_temp)
        values = {"teacher_entropy": entropy, "kl": float(sm.detach()) - entropy}
        if step.student_features is not None:
            values["student_cos"] = mean_pairwise_cosine(step.student_features[: step.student_features.shape[0] // 2])
        return {name + suffix: value for name, value in values.items()}

    def _student_step(self, index: int, global_crops: torch.Tensor, local_crops: torch.Tensor | None,
                      step: ModelStep) -> None:
        """Fill the student fields of `step` (one forward call: DDP sees one forward per backward)."""
        outputs = self._student_forwards[index](global_crops, local_crops, outputs=self._student_outputs)
        for name, value in outputs.items():
            setattr(step, f"student_{name}", value)

    @torch.no_grad()
    def _teacher_step(self, index: int, global_crops: torch.Tensor, step: ModelStep) -> torch.Tensor | None:
        """Fill the teacher fields of `step`; return the T-Head tokens of global crop 1 of each image (what the
        peer's search attends over), or None when the search term is off."""
        teacher = self.teachers[index]
        pooled, feature_map = teacher.features(global_crops)
        if "teacher_mlp" in self._needed:
            step.teacher_mlp = teacher.head(pooled)
        if not self._needed & {"teacher_thead", "teacher_search"}:
            return None
        tokens, _ = teacher.transhead.tokens(feature_map)
        if "teacher_thead" in self._needed:
            step.teacher_thead = teacher.transhead.encode(tokens)
        return tokens[: tokens.shape[0] // 2] if "teacher_search" in self._needed else None

    @torch.no_grad()
    def _search(self, index: int, tokens: torch.Tensor, peer_query: torch.Tensor) -> torch.Tensor:
        """Teacher `index`'s T-Head over `tokens` (its global crop 1), searched with the peer student's queries."""
        return self.teachers[index].transhead.search(tokens, peer_query)

    def _self_terms(self, step: ModelStep, suffix: str,
                    teacher_temp: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        losses, batch_centers = {}, {}
        if "sm" in self.enabled:
            losses["sm"] = distillation_loss(step.student_mlp, step.teacher_mlp, self.centers["sm" + suffix],
                                             teacher_temp, self.cfg.student_temp,
                                             student_log_probs=step.mlp_log_probs(self.cfg.student_temp))
            batch_centers["sm"] = batch_center(step.teacher_mlp)
        if "st" in self.enabled:
            student = torch.cat([t for t in (step.student_thead_global, step.student_thead_local) if t is not None])
            losses["st"] = distillation_loss(student, step.teacher_thead, self.centers["st" + suffix],
                                             teacher_temp, self.cfg.student_temp)
            batch_centers["st"] = batch_center(step.teacher_thead)
        return losses, batch_centers

    def update_teachers(self, momentum: float) -> None:
        ema_update(self.students, self.teachers, momentum)

    def param_groups(self, index: int) -> list[dict]:
        """Optimizer groups of student `index`: backbone+MLP-Head ("main") and T-Head ("thead"), each split
        into weights (regularized) and biases/norms (ndim <= 1, no weight decay). Frozen parameters are left out."""
        buckets: dict[tuple[str, bool], list[nn.Parameter]] = {
            (part, regularized): [] for part in ("main", "thead") for regularized in (True, False)}
        for name, param in self.students[index].named_parameters():
            if param.requires_grad:
                part = "thead" if name.startswith("transhead.") else "main"
                buckets[(part, param.ndim > 1)].append(param)
        return [{"params": params, "name": f"{part}_{'regularized' if regularized else 'unregularized'}",
                 "regularized": regularized, "part": part}
                for (part, regularized), params in buckets.items() if params]

    def last_layer_parameters(self, index: int) -> list[nn.Parameter]:
        """Trainable parameters of both heads' last layers (kept frozen during the first epoch)."""
        student = self.students[index]
        layers = (student.head.last_layer, student.transhead.last_layer)
        return [param for layer in layers for param in layer.parameters() if param.requires_grad]

    def centers_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: center.detach().clone() for name, center in self.centers.named_buffers()}

    def load_centers_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {name: tuple(center.shape) for name, center in self.centers.named_buffers()}
        found = {name: tuple(value.shape) for name, value in state.items()}
        if found != expected:
            raise MokdError(f"checkpoint centers {found} do not match this configuration's {expected}: "
                            f"resume with the same out_dim and cross objective")
        self.centers.load_state_dict(state)
