"""Collapse monitor: three numbers per model that tell a learning DINO-style run from a collapsing one.

Measured on each model's self MLP term (sm), every step, averaged per epoch:
- `teacher_entropy`: mean entropy of the centred, sharpened teacher targets, in nats (ln K = uniform);
- `kl`: mean KL(teacher target || student prediction) over the loss's view pairs, i.e. sm minus that entropy
  (each teacher view is paired with the same number of student views, so the pair means separate exactly);
- `student_cos`: mean cosine between different images' student features (pooled vector / CLS, global crop 1).
A run learns while the entropy sits clearly below ln K, the KL is not ~0 and the features differ between images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MONITORED = ("teacher_entropy", "kl", "student_cos")
UNIFORM_FRACTION = 0.95  # teacher entropy above this share of ln K: near-uniform targets
ONE_HOT_FRACTION = 0.05  # below this share of ln K: targets concentrate on a few dimensions
SAME_FEATURE_COSINE = 0.99  # every image looks alike to the student


@torch.no_grad()
def target_entropy(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> float:
    """Mean entropy (nats) of softmax((t - c) / τt) over the teacher rows."""
    log_p = F.log_softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)
    return float(-(log_p.exp() * log_p).sum(dim=-1).mean())


@torch.no_grad()
def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of different rows (1.0 = every row points the same way)."""
    rows = features.shape[0]
    if rows < 2:
        return float("nan")
    unit = F.normalize(features.float(), dim=-1)
    similarity = unit @ unit.T
    return float((similarity.sum() - similarity.diagonal().sum()) / (rows * (rows - 1)))


def diagnose(means: dict[str, float], model: str, out_dim: int) -> list[str]:
    """Warnings naming the likely cause when one model's epoch means look like a collapse."""
    warnings = []
    uniform = math.log(out_dim)
    entropy, cosine = means.get("teacher_entropy"), means.get("student_cos")
    if entropy is not None and entropy >= UNIFORM_FRACTION * uniform:
        warnings.append(
            f"{model}: teacher targets are near uniform (entropy {entropy:.3f} of ln K = {uniform:.3f}): uniform "
            f"collapse, the sharpening is too weak for the centring; lower the teacher temperature, turn on "
            f"--mlp-bn, or lower the learning rate / raise the EMA momentum if it followed a rise")
    elif entropy is not None and entropy <= ONE_HOT_FRACTION * uniform:
        warnings.append(
            f"{model}: teacher targets sit on a few dimensions (entropy {entropy:.3f} of ln K = {uniform:.3f}): "
            f"dimensional collapse, the centring is too weak for the sharpening; raise the teacher temperature")
    if cosine is not None and cosine >= SAME_FEATURE_COSINE:
        warnings.append(
            f"{model}: student features are almost the same for every image (mean pairwise cosine {cosine:.3f}): "
            f"representation collapse; lower the learning rate, raise the EMA momentum or turn on --mlp-bn")
    return warnings
