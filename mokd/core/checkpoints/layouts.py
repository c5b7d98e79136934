"""Layout recognition: which networks a checkpoint holds (mokd, official MOKD, DINO, MoCo or a plain state
dict), which of them to evaluate by default, and which tensors are heads to set aside.

Why: the usual failure of self-supervised evaluation code is a wrong prefix or key; deciding the layout
from the top-level keys, and refusing unknown prefixes, keeps that failure loud. Head tensors (`head.*`,
`transhead.*`, `fc.*`) stay available in `ModelEntry.full_state` for the trainer's `--init-from`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mokd.core.checkpoints.architecture import infer_arch
from mokd.core.checkpoints.files import file_sha256, load_object, strip_module_prefix
from mokd.core.errors import MokdError
from mokd.core.registry import ArchSpec

BACKBONE = "backbone"
HEAD_PREFIXES = ("head", "transhead", "fc")
OFFICIAL_MODELS = ("teacher_cnn", "student_cnn", "teacher_vit", "student_vit")


@dataclass
class ModelEntry:
    """One network inside a checkpoint file, split into backbone tensors and head tensors."""

    key: str
    spec: ArchSpec
    inferred: bool
    backbone_state: dict[str, torch.Tensor]
    head_keys: list[str]
    full_state: dict[str, torch.Tensor]


@dataclass
class CheckpointFile:
    """What a file holds, read once: its format, its networks and which of them to evaluate by default."""

    path: Path
    sha256: str
    format: str
    top_level_keys: list[str]
    entries: dict[str, ModelEntry]
    default_keys: list[str]
    epoch: int | None
    meta: dict


@dataclass
class _Layout:
    """A recognised file before arch inference: raw tensor dicts per model key."""

    format: str
    models: dict[str, Mapping[str, Any]]
    default_keys: list[str]
    stored_specs: dict[str, ArchSpec] = dataclasses.field(default_factory=dict)
    meta: dict = dataclasses.field(default_factory=dict)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def name_prefixes(names: list[str] | Mapping[str, Any]) -> list[str]:
    """Distinct first name components, in order of appearance, e.g. ['backbone.', 'head.']."""
    return list(dict.fromkeys(name.split(".", 1)[0] + "." for name in names))


def _epoch_of(obj: Mapping[str, Any]) -> int | None:
    epoch = obj.get("epoch")
    if isinstance(epoch, torch.Tensor) and epoch.numel() == 1:
        return int(epoch.item())
    return int(epoch) if isinstance(epoch, int) else None


def _split_flat_state(state: Mapping[str, torch.Tensor], fmt: str, path: Path) -> _Layout:
    """A flat state dict: MoCo's query/key encoders when present, else one model."""
    stripped = strip_module_prefix(state, str(path))
    encoders = {
        name: {k.removeprefix(f"{name}."): v for k, v in stripped.items() if k.startswith(f"{name}.")}
        for name in ("encoder_q", "encoder_k")
    }
    if encoders["encoder_q"]:
        models = {name: tensors for name, tensors in encoders.items() if tensors}
        return _Layout("moco" if fmt == "state_dict" else fmt, models, ["encoder_q"])
    return _Layout(fmt, {"model": stripped}, ["model"])


def _mokd_native(obj: Mapping[str, Any]) -> _Layout:
    """Written by mokd's trainer: architectures are stored, nothing is inferred."""
    if obj["mokd_format"] != 1:
        raise MokdError(f"mokd checkpoint format {obj['mokd_format']!r} is not supported by this version "
                        "(expected 1): upgrade mokd")
    archs = {str(index): ArchSpec.from_dict(spec) for index, spec in dict(obj.get("archs", {})).items()}
    models, specs = {}, {}
    for index in ("1", "2"):
        for role in ("teacher", "student"):
            key = f"{role}{index}"
            if key in obj:
                if index not in archs:
                    raise MokdError(f"mokd checkpoint has '{key}' but no archs['{index}'] describing it: "
                                    "the file is damaged")
                models[key], specs[key] = obj[key], archs[index]
    meta = {name: obj[name] for name in ("mode", "config", "method") if name in obj}
    meta["archs"] = {index: spec.to_dict() for index, spec in archs.items()}
    # Methods whose online networks are the result (DoGo, MCL's query encoders) name them in eval_keys.
    defaults = [str(key) for key in obj.get("eval_keys", ["teacher1", "teacher2"])]
    return _Layout("mokd", models, defaults, stored_specs=specs, meta=meta)


def _mokd_official(obj: Mapping[str, Any]) -> _Layout:
    models = {k: v for k, v in obj.items() if k in OFFICIAL_MODELS}
    meta = {k: obj[k] for k in ("arch_cnn", "arch_vit") if k in obj}
    return _Layout("mokd-official", models, ["teacher_cnn", "teacher_vit"], meta=meta)


def _dino(obj: Mapping[str, Any]) -> _Layout:
    models = {k: obj[k] for k in ("teacher", "student") if k in obj}
    args = obj.get("args")
    meta = {"args": vars(args) if isinstance(args, argparse.Namespace) else args} if args is not None else {}
    return _Layout("dino", models, ["teacher"], meta=meta)


def _wrapped_state_dict(obj: Mapping[str, Any], path: Path) -> _Layout:
    """`{"state_dict": sd, ...}` (MoCo, Lightning-like) or `{"model": sd, ...}` (DeiT, MAE)."""
    state = obj["state_dict"] if _is_state_dict(obj.get("state_dict")) else obj["model"]
    layout = _split_flat_state(state, "state_dict", path)
    layout.meta = {k: obj[k] for k in ("arch",) if k in obj}
    return layout


def _recognise(obj: Any, path: Path, file_meta: dict[str, Any]) -> tuple[_Layout, list[str]]:
    """Decide the format from the top-level keys; return the layout and the file's top-level keys
    (for a bare state dict: its distinct name prefixes)."""
    if _is_state_dict(obj):
        fmt = "safetensors" if file_meta["origin"] == "safetensors" else "state_dict"
        layout = _split_flat_state(obj, fmt, path)
        top = name_prefixes(obj)
    elif isinstance(obj, Mapping) and obj:
        top = [str(k) for k in obj]
        if "mokd_format" in obj:
            layout = _mokd_native(obj)
        elif any(k in obj for k in OFFICIAL_MODELS):
            layout = _mokd_official(obj)
        elif isinstance(obj.get("teacher"), Mapping):
            layout = _dino(obj)
        elif _is_state_dict(obj.get("state_dict")) or _is_state_dict(obj.get("model")):
            layout = _wrapped_state_dict(obj, path)
        else:
            raise MokdError(f"checkpoint {path} has an unknown layout (top-level keys: {', '.join(top[:8])}): "
                            "expected a mokd, official MOKD, DINO or MoCo checkpoint or a state dict")
    else:
        raise MokdError(f"checkpoint {path} holds {type(obj).__name__}, not a dict of model weights: "
                        "save a state dict instead")
    layout.meta = {**file_meta, **layout.meta}
    return layout, top


def _split_backbone(where: str, full: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Backbone tensors (prefix-stripped) and the names of head tensors set aside.

    Two layouts: wrapped (`backbone.*` next to `head.*`/`transhead.*`, as DINO and MOKD save) and flat
    (timm/torchvision names, classifier in `fc.*` or `head.*`).
    """
    wrapped = any(name.startswith(f"{BACKBONE}.") for name in full)
    if wrapped:
        unknown = [p for p in name_prefixes(full) if p[:-1] not in (BACKBONE, *HEAD_PREFIXES)]
        if unknown:
            raise MokdError(f"{where} holds tensors under unknown prefixes {', '.join(unknown[:5])}: expected only "
                            f"backbone., head., transhead. (and fc.); this is not a layout mokd can load safely")
    backbone, heads = {}, []
    for name, tensor in full.items():
        inner = name.removeprefix(f"{BACKBONE}.") if wrapped else name
        if inner.split(".", 1)[0] in HEAD_PREFIXES:
            heads.append(name)
        else:
            backbone[inner] = tensor
    if not backbone:
        raise MokdError(f"{where} holds no backbone tensors (prefixes: {', '.join(name_prefixes(full)[:6])}): "
                        "pick another model with --key")
    return backbone, heads


def head_groups(head_keys: list[str]) -> list[str]:
    """['head.*', 'transhead.*'] -- where the set-aside tensors live, for reports."""
    groups = []
    for name in head_keys:
        parts = name.split(".")
        depth = next(i for i, part in enumerate(parts) if part in HEAD_PREFIXES)
        groups.append(".".join(parts[:depth + 1]) + ".*")
    return list(dict.fromkeys(groups))


def _make_entry(path: Path, key: str, tensors: Any, stored: ArchSpec | None) -> ModelEntry:
    where = f"{path} '{key}'"
    if not isinstance(tensors, Mapping) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise MokdError(f"{where} is not a state dict of tensors: the checkpoint is damaged or of another kind")
    full = strip_module_prefix(tensors, where)
    backbone, heads = _split_backbone(where, full)
    spec = stored if stored is not None else infer_arch(backbone, where=where)
    return ModelEntry(key=key, spec=spec, inferred=stored is None, backbone_state=backbone, head_keys=heads,
                      full_state=full)


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> CheckpointFile:
    """Read a checkpoint of any supported format and describe every network in it."""
    path = Path(path)
    obj, file_meta = load_object(path, trust=trust)
    layout, top = _recognise(obj, path, file_meta)
    entries = {key: _make_entry(path, key, tensors, layout.stored_specs.get(key))
               for key, tensors in layout.models.items()}
    defaults = [key for key in layout.default_keys if key in entries] or list(entries)
    epoch = _epoch_of(obj) if isinstance(obj, Mapping) and not _is_state_dict(obj) else None
    return CheckpointFile(path=path, sha256=file_sha256(path), format=layout.format, top_level_keys=top,
                          entries=entries, default_keys=defaults, epoch=epoch, meta=layout.meta)
