"""Loss terms of DoGo and MCL (spec `online-kd-peers.md`), as pure functions of embeddings and logits.

- `nt_xent`: SimCLR's contrastive loss over 2B views, 2B - 2 in-batch negatives per anchor.
- `relation_kl`: DoGo's relation distillation, KL(peer's detached row distribution || own) of the
  view-1-vs-view-2 cosine matrix, reduced by ÷B² (PyTorch's old 'mean') or per row ('batchmean').
- `contrastive_logits`, `mcl_terms`: MCL's within- and across-network MoCo logits and its four terms.

Everything is computed in fp32 whatever the autocast dtype (autocast is switched off inside, since it would
otherwise run the matmuls in bf16/fp16): these losses exponentiate cosines divided by small temperatures.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

DOGO_TEMPERATURE = 0.5
DOGO_KL_TEMPERATURE = 0.1
MCL_TEMPERATURE = 0.07
MCL_KD_TEMPERATURE = 3.0
REDUCTIONS = ("b2", "batchmean")
Function = TypeVar("Function", bound=Callable)


def in_fp32(function: Function) -> Function:
    """Run `function` with autocast off on its first argument's device (its tensors are cast to fp32 inside)."""

    @functools.wraps(function)
    def wrapper(first: torch.Tensor, *args, **kwargs):
        with torch.autocast(device_type=first.device.type, enabled=False):
            return function(first, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@in_fp32
def nt_xent(z_x: torch.Tensor, z_y: torch.Tensor, temperature: float = DOGO_TEMPERATURE) -> torch.Tensor:
    """Mean over the 2B anchors of -log softmax(positive) among the 2B - 1 other views (inputs L2-normalised)."""
    z = torch.cat([z_x, z_y]).float()
    batch = z_x.shape[0]
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * batch, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(z.device)
    return F.cross_entropy(logits, positives)


@in_fp32
def relation_log_probs(z_x: torch.Tensor, z_y: torch.Tensor,
                       temperature: float = DOGO_KL_TEMPERATURE) -> torch.Tensor:
    """Row log-softmax of R_ij = cos(z_x,i, z_y,j) / τ_KL (view-1 rows, view-2 columns, not symmetrised)."""
    cosine = F.normalize(z_x.float(), dim=-1) @ F.normalize(z_y.float(), dim=-1).T
    return F.log_softmax(cosine / temperature, dim=-1)


def relation_kl(own: torch.Tensor, peer: torch.Tensor, reduction: str = "b2") -> torch.Tensor:
    """KL(P_peer ‖ P_own) from row log-probabilities (B×B); the peer side is detached here.

    `b2` divides the summed KL by B² (DoGo's shipped reduction), `batchmean` by B.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    target = peer.detach()
    total = (target.exp() * (target - own)).sum()
    batch = own.shape[0]
    return total / (batch * batch if reduction == "b2" else batch)


@in_fp32
def contrastive_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
                       temperature: float = MCL_TEMPERATURE) -> torch.Tensor:
    """MoCo logits [q·k, q·queue] / T (B×(1+K)); the positive is column 0. Keys and queue carry no gradient;
    the queue is copied because it is overwritten in place (the enqueue) before the backward pass."""
    q = q.float()
    positive = (q * k.detach().float()).sum(dim=-1, keepdim=True)
    negatives = q @ queue.detach().float().clone().T
    return torch.cat([positive, negatives], dim=1) / temperature


def contrastive_ce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with target index 0 (the positive key), mean over the batch.

    Written as softplus(logsumexp(negatives − positive)) = log(1 + Σ exp(ℓ_j − ℓ_0)), the same value as
    `F.cross_entropy` but without its cancellation in fp32 when the positive dominates (an aligned pair at
    T = 0.07 gives 5e-6, which logsumexp(ℓ) − ℓ_0 rounds to a multiple of 1e-6).
    """
    return F.softplus(torch.logsumexp(logits[:, 1:] - logits[:, :1], dim=1)).mean()


@in_fp32
def soft_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = MCL_KD_TEMPERATURE) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), batchmean; the teacher logits are detached."""
    target = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    log_probs = F.log_softmax(student.float() / temperature, dim=-1)
    return temperature ** 2 * F.kl_div(log_probs, target, reduction="batchmean", log_target=True)


def mcl_terms(own_within: torch.Tensor, own_across: torch.Tensor, peer_within: torch.Tensor,
              peer_across: torch.Tensor, *, interactive: bool) -> dict[str, torch.Tensor]:
    """Network i's MCL terms from ℓ_ii (own_within), ℓ_ij (own_across), ℓ_jj and ℓ_ji (the peer's).

    vcl = CE(ℓ_ii); with `interactive`: kdv = KD(ℓ_ii ‖ sg ℓ_jj), icl = CE(ℓ_ij), kdi = KD(ℓ_ij ‖ sg ℓ_ji).
    """
    terms = {"vcl": contrastive_ce(own_within)}
    if interactive:
        terms["kdv"] = soft_kd(own_within, peer_within)
        terms["icl"] = contrastive_ce(own_across)
        terms["kdi"] = soft_kd(own_across, peer_across)
    return terms
