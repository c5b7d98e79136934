"""The `inspect` report: a JSON-able summary of what a checkpoint holds, without loading it into a model.

Why: choosing `--key` and `--model` needs the file's format, networks, architectures and sizes at a glance.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from mokd.core.checkpoints.architecture import spec_to_build
from mokd.core.checkpoints.layouts import ModelEntry, head_groups, read_checkpoint
from mokd.core.checkpoints.loading import compare_state
from mokd.core.registry import meta_backbone


def _numel(tensors: Mapping[str, torch.Tensor], names: set[str] | list[str]) -> int:
    return sum(tensors[name].numel() for name in names if name in tensors)


def _describe_entry(entry: ModelEntry) -> dict[str, Any]:
    reference = meta_backbone(spec_to_build(entry.spec, entry.backbone_state, f"'{entry.key}'"))
    params = {name for name, _ in reference.named_parameters()}
    buffers = {name for name, _ in reference.named_buffers()}
    return {
        "key": entry.key,
        "arch": entry.spec.name,
        "describe": entry.spec.describe(),
        "arch_spec": entry.spec.to_dict(),
        "inferred": entry.inferred,
        "matches_arch": not compare_state(reference.state_dict(), entry.backbone_state),
        "backbone_tensors": len(entry.backbone_state),
        "backbone_params": _numel(entry.backbone_state, params),
        "backbone_buffer_numel": _numel(entry.backbone_state, buffers),
        "head_tensors": len(entry.head_keys),
        "head_params": _numel(entry.full_state, entry.head_keys),
        "head_prefixes": head_groups(entry.head_keys),
        "head_tensor_names": list(entry.head_keys),
    }


def inspect_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> dict[str, Any]:
    """A JSON-able summary of a checkpoint: format, keys, models with their architecture and sizes."""
    ckpt = read_checkpoint(path, trust=trust)
    summary = {
        "path": str(ckpt.path),
        "sha256": ckpt.sha256,
        "format": ckpt.format,
        "top_level_keys": ckpt.top_level_keys,
        "epoch": ckpt.epoch,
        "default_keys": ckpt.default_keys,
        "models": [_describe_entry(entry) for entry in ckpt.entries.values()],
        "meta": ckpt.meta,
    }
    return json.loads(json.dumps(summary, default=str))
