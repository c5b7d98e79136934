"""Loss terms of two-model self-distillation.

- `distillation_loss`: DINO's centered cross-entropy with multi-crop pairing (MOKD's sm, st and cm terms).
- `search_loss`: MOKD's cross-attention feature-search term (ct): one-to-one, no center.
- `Centers`: the per-term DINO centers, updated together after a step (one all-reduce).
- `CrossObjective`: how two models learn from each other, on top of each model's self-distillation.
  `MokdCrossObjective` is MOKD's (cm + ct); DoGo/MCL-style objectives can implement the same interface.

All logits are rows in view-major order: every image's crop 0, then every image's crop 1, and so on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mokd.core.errors import MokdError

N_GLOBAL = 2


class NonFiniteLossError(MokdError):
    """A loss term became NaN or infinite: training diverged and must not continue silently."""

    def __init__(self, term: str) -> None:
        super().__init__(f"loss term {term} is not finite: training diverged; lower the learning rate "
                         f"or resume from an earlier checkpoint")
        self.term = term


def log_softmax(student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """log_softmax(s / τs) over K in float32: the student side of every DINO-style term."""
    return F.log_softmax(student_logits.float() / student_temp, dim=-1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
                      teacher_temp: float, student_temp: float, *,
                      student_log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of H(teacher view i, student view v) over all pairs with v != i.

    `teacher_logits` holds the 2 global views (2B×K), `student_logits` all V views (V·B×K), the globals
    first. H(t, s) = -Σ softmax((t - c)/τt) · log_softmax(s/τs), averaged over the batch.
    `student_log_probs`, when given, is `log_softmax(student_logits, student_temp)` computed once by the
    caller and shared between terms on the same student output (sm and cm).
    """
    batch = teacher_logits.shape[0] // N_GLOBAL
    if teacher_logits.shape[0] != N_GLOBAL * batch or student_logits.shape[0] % batch:
        raise ValueError(f"expected 2B teacher rows and V·B student rows, got {teacher_logits.shape[0]} "
                         f"and {student_logits.shape[0]}")
    n_views = student_logits.shape[0] // batch
    targets = F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1).detach()
    log_probs = student_log_probs if student_log_probs is not None else log_softmax(student_logits, student_temp)
    pair_losses = -torch.einsum("tbk,vbk->tv", targets.view(N_GLOBAL, batch, -1),
                                log_probs.view(n_views, batch, -1)) / batch
    different_views = ~torch.eye(N_GLOBAL, n_views, dtype=torch.bool, device=pair_losses.device)
    return pair_losses[different_views].mean()


def search_loss(student_logits: torch.Tensor, target_logits: torch.Tensor, teacher_temp: float,
                student_temp: float) -> torch.Tensor:
    """Row-by-row cross-entropy to a detached, sharpened, uncentered target, averaged over rows."""
    targets = F.softmax(target_logits.float() / teacher_temp, dim=-1).detach()
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(targets * log_probs).sum(dim=-1).mean()


def batch_center(teacher_logits: torch.Tensor) -> torch.Tensor:
    """This rank's mean of the raw teacher logits (1×K), the input of a center update."""
    return teacher_logits.detach().float().mean(dim=0, keepdim=True)


class Centers(nn.Module):
    """DINO centers (1×K buffers, one per centered loss term), kept out of the teachers' EMA."""

    def __init__(self, names: list[str], dim: int, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        for name in names:
            self.register_buffer(name, torch.zeros(1, dim))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get_buffer(name)

    @torch.no_grad()
    def update(self, batch_means: Mapping[str, torch.Tensor]) -> None:
        """c ← m·c + (1−m)·mean, the means averaged over ranks in a single all-reduce."""
        if not batch_means:
            return
        names = list(batch_means)
        means = torch.cat([batch_means[name] for name in names])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(means)
            means /= dist.get_world_size()
        for name, mean in zip(names, means, strict=True):
            self[name].mul_(self.momentum).add_(mean.unsqueeze(0), alpha=1 - self.momentum)


@dataclass
class ModelStep:
    """One model's outputs in a training step; fields the enabled terms do not need stay None."""

    student_mlp: torch.Tensor | None = None           # MLP-Head, all crops
    student_thead_global: torch.Tensor | None = None  # T-Head, the 2 global crops
    student_thead_local: torch.Tensor | None = None   # T-Head, the local crops
    student_query: torch.Tensor | None = None         # detached search queries of the local crops (L·B×D)
    student_features: torch.Tensor | None = None      # detached backbone features of the 2 global crops (monitor)
    teacher_mlp: torch.Tensor | None = None           # teacher MLP-Head, the 2 global crops
    teacher_thead: torch.Tensor | None = None         # teacher T-Head, the 2 global crops
    teacher_search: torch.Tensor | None = None        # teacher T-Head searched with the PEER's queries (L·B×K)
    _mlp_log_probs: dict[float, torch.Tensor] = field(default_factory=dict, repr=False)

    def mlp_log_probs(self, student_temp: float) -> torch.Tensor:
        """log_softmax of `student_mlp` at τs, computed once per step and shared by sm and cm."""
        if student_temp not in self._mlp_log_probs:
            self._mlp_log_probs[student_temp] = log_softmax(self.student_mlp, student_temp)
        return self._mlp_log_probs[student_temp]


class CrossObjective(ABC):
    """The terms through which each model learns from the other (self-distillation is shared by all methods).

    The caller computes the `ModelStep` fields named by `required_outputs`, passes per-model centers keyed
    by term name, applies the returned batch centers only once every term is known to be finite, and weights
    the sum of the returned terms by the model's λ.
    """

    terms: tuple[str, ...]
    centered_terms: tuple[str, ...]

    @abstractmethod
    def required_outputs(self, enabled: frozenset[str]) -> frozenset[str]:
        """Names of the `ModelStep` fields (for both models) that the enabled terms read."""

    @abstractmethod
    def __call__(self, own: ModelStep, peer: ModelStep, enabled: frozenset[str], centers: Mapping[str, torch.Tensor],
                 teacher_temp: float, student_temp: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """`(loss per enabled term, batch center per enabled centered term)` for the model owning `own`."""


class MokdCrossObjective(CrossObjective):
    """MOKD's cross-distillation: cm (MLP-Head vs the peer teacher) and ct (T-Head vs the peer's search)."""

    terms = ("cm", "ct")
    centered_terms = ("cm",)

    def required_outputs(self, enabled: frozenset[str]) -> frozenset[str]:
        needed: set[str] = set()
        if "cm" in enabled:
            needed |= {"student_mlp", "teacher_mlp"}
        if "ct" in enabled:
            needed |= {"student_thead_local", "student_query", "teacher_search"}
        return frozenset(needed)

    def __call__(self, own: ModelStep, peer: ModelStep, enabled: frozenset[str], centers: Mapping[str, torch.Tensor],
                 teacher_temp: float, student_temp: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        losses: dict[str, torch.Tensor] = {}
        batch_centers: dict[str, torch.Tensor] = {}
        if "cm" in enabled:
            losses["cm"] = distillation_loss(own.student_mlp, peer.teacher_mlp, centers["cm"],
                                             teacher_temp, student_temp,
                                             student_log_probs=own.mlp_log_probs(student_temp))
            batch_centers["cm"] = batch_center(peer.teacher_mlp)
        if "ct" in enabled:
            losses["ct"] = search_loss(own.student_thead_local, peer.teacher_search, teacher_temp, student_temp)
        return losses, batch_centers
