"""Strict loading: build the architecture and load a checkpoint's backbone into it tensor by tensor.

Why: `strict=False` silently turns a wrong prefix or key into a randomly initialised network. Here every
backbone is compared against the architecture first, so a mismatch is one readable line naming what the
file holds and which option to change, and the report says what was loaded and what was set aside.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mokd.core.checkpoints.architecture import VIT_HEAD_DIM, spec_to_build
from mokd.core.checkpoints.files import TRUSTED
from mokd.core.checkpoints.layouts import CheckpointFile, ModelEntry, head_groups, name_prefixes, read_checkpoint
from mokd.core.errors import MokdError
from mokd.core.registry import ArchSpec, meta_backbone, resolve_arch
from mokd.core.validation import check_image_size


@dataclass
class LoadedBackbone:
    """A backbone whose weights were proven to match the file (strict load), ready for evaluation."""

    key: str
    spec: ArchSpec
    module: nn.Module
    checkpoint: CheckpointFile
    report: str


@dataclass
class StateMismatch:
    """Key and shape differences between a model and a state dict; falsy when they match."""

    missing: list[str]
    unexpected: list[str]
    shapes: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def describe(self) -> str:
        def part(label: str, names: list[str]) -> str:
            return f"{len(names)} {label}" + (f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                                              if names else "")
        return ", ".join([part("missing", self.missing), part("unexpected", self.unexpected),
                          part("shape mismatches", self.shapes)])


def compare_state(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> StateMismatch:
    """Key and shape differences, computed before load_state_dict so the error can be one line."""
    shapes = [f"{name}: file {list(found[name].shape)} vs model {list(tensor.shape)}"
              for name, tensor in expected.items() if name in found and found[name].shape != tensor.shape]
    return StateMismatch(missing=[n for n in expected if n not in found],
                         unexpected=[n for n in found if n not in expected], shapes=shapes)


def _arch_note(entry: ModelEntry, spec: ArchSpec, forced: bool) -> str:
    if forced:
        return f"--model: {spec.describe()}"
    if entry.inferred:
        heads = f"; heads assumed {VIT_HEAD_DIM} wide" if spec.is_vit else ""
        return f"inferred: {spec.describe()}{heads}"
    return f"stored: {spec.describe()}"


def _uninitialised_backbone(spec: ArchSpec) -> nn.Module:
    """`spec` on CPU without random init: initialising a ViT costs seconds and the strict load overwrites
    every tensor anyway -- provided all of them are in the state dict, which is checked here."""
    module = meta_backbone(spec).to_empty(device="cpu")
    tensors = {name for name, _ in module.named_parameters()} | {name for name, _ in module.named_buffers()}
    not_saved = tensors - set(module.state_dict())
    if not_saved:
        raise RuntimeError(f"{spec.name} has tensors a state dict does not restore: {sorted(not_saved)[:3]}")
    return module


def _strict_module(ckpt: CheckpointFile, entry: ModelEntry, spec: ArchSpec) -> nn.Module:
    """Build `spec` and load the entry's backbone strictly, after a readable one-line key/shape check."""
    module = _uninitialised_backbone(spec)
    mismatch = compare_state(module.state_dict(), entry.backbone_state)
    if mismatch:
        raise MokdError(f"{ckpt.path} '{entry.key}' does not match {spec.describe()}: {mismatch.describe()}; "
                        f"prefixes in '{entry.key}': {', '.join(name_prefixes(entry.full_state)[:6])}; "
                        f"models in the file: {', '.join(ckpt.entries)}; "
                        "hint: choose the model with --key or the architecture with --model")
    module.load_state_dict(entry.backbone_state, strict=True)
    return module.eval()


def _load_entry(ckpt: CheckpointFile, entry: ModelEntry, model: str | None, img_size: int | None) -> LoadedBackbone:
    built = spec_to_build(resolve_arch(model) if model else entry.spec, entry.backbone_state,
                        f"{ckpt.path} '{entry.key}'")
    check_image_size(img_size, built)
    module = _strict_module(ckpt, entry, built)
    count = len(entry.backbone_state)
    heads = (f"set aside {len(entry.head_keys)} head tensors ({', '.join(head_groups(entry.head_keys))})"
             if entry.head_keys else "no head tensors")
    report = (f"{entry.key}: loaded {count}/{count} backbone tensors strictly "
              f"({_arch_note(entry, built, model is not None)}); {heads}")
    final = built if img_size is None else dataclasses.replace(built, img_size=img_size)
    if built.is_vit and final.img_size != built.img_size:
        report += f"; position embedding kept at {built.img_size}px, resampled on the fly for {img_size}px inputs"
    if ckpt.meta.get(TRUSTED):
        report += "; WARNING: unpickled with --trust-checkpoint"
    return LoadedBackbone(key=entry.key, spec=final, module=module, checkpoint=ckpt, report=report)


def load_backbones(path: str | os.PathLike, *, model: str | None = None, key: str | None = None,
                   trust: bool = False, img_size: int | None = None) -> list[LoadedBackbone]:
    """Strictly loaded backbones: the one named by `key`, or every default model of the file.

    `model` forces the architecture (an alias or timm name); the strict load proves it fits the tensors.
    `img_size` sets the evaluation resolution in the returned spec; a ViT keeps the file's position
    embedding grid and resamples it at forward time.
    """
    ckpt = read_checkpoint(path, trust=trust)
    if key is not None and key not in ckpt.entries:
        raise MokdError(f"--key {key!r} is not in {ckpt.path} ({ckpt.format} checkpoint): "
                        f"available keys are {', '.join(ckpt.entries)}")
    keys = [key] if key is not None else ckpt.default_keys
    return [_load_entry(ckpt, ckpt.entries[k], model, img_size) for k in keys]


# ---------------------------------------------------------------------------------------------
# Inspection
