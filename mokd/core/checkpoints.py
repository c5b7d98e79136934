"""One loader for every checkpoint format mokd evaluates: mokd's own, official MOKD, DINO, MoCo,
plain timm/torchvision state dicts and `.safetensors` files.

Why one loader: the usual failure of self-supervised evaluation code is a wrong prefix or key that
`strict=False` silently turns into a randomly initialised network. Here every file is unpickled
with `weights_only=True`, every backbone is matched tensor by tensor against the architecture
(stored in mokd checkpoints, inferred from tensor shapes otherwise) and loaded strictly, and every
mismatch is one readable line that says what the file holds and which option to change.

Head tensors (`head.*`, `transhead.*`, `fc.*`) are recognised and set aside; they stay available in
`ModelEntry.full_state` for the trainer's `--init-from`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from mokd.core.errors import MokdError
from mokd.core.validation import check_image_size
from mokd.core.registry import ALIASES, ArchSpec, build_backbone, resolve_arch

MODULE_PREFIX = "module."
BACKBONE = "backbone"
HEAD_PREFIXES = ("head", "transhead", "fc")
OFFICIAL_MODELS = ("teacher_cnn", "student_cnn", "teacher_vit", "student_vit")
# Classes a checkpoint may hold besides tensors and containers: DINO stores its argparse options.
SAFE_GLOBALS = [argparse.Namespace]
TRUSTED = "unpickled_with_trust"  # meta flag: the file was loaded with weights_only=False
VIT_HEAD_DIM = 64  # assumed attention-head width of inferred ViTs: tiny/small/base all use 64
HASH_CHUNK_BYTES = 1 << 20


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
class LoadedBackbone:
    """A backbone whose weights were proven to match the file (strict load), ready for evaluation."""

    key: str
    spec: ArchSpec
    module: nn.Module
    checkpoint: CheckpointFile
    report: str


@dataclass
class _Layout:
    """A recognised file before arch inference: raw tensor dicts per model key."""

    format: str
    models: dict[str, Mapping[str, Any]]
    default_keys: list[str]
    stored_specs: dict[str, ArchSpec] = dataclasses.field(default_factory=dict)
    meta: dict = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Reading the file


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, memoised while the file is unchanged (checkpoints are large and re-read)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _sha256_of(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """`size` and `mtime_ns` only key the cache: a rewritten file is hashed again."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_is_file(path: Path) -> None:
    """Fail early and clearly: never let a missing file fall through to some other weights."""
    if not path.exists():
        raise MokdError(f"checkpoint {path} does not exist: check the path (nothing is loaded in its place)")
    if path.is_dir():
        raise MokdError(f"checkpoint {path} is a directory: pass the checkpoint file inside it")
    if path.stat().st_size == 0:
        raise MokdError(f"checkpoint {path} is an empty file: the save was probably interrupted; use another file")


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length followed by a JSON object."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") < path.stat().st_size


def _unreadable(path: Path, error: BaseException) -> MokdError:
    """One line from torch's or safetensors' multi-line complaint: its first sentence that says what failed."""
    text = str(error).split("WeightsUnpickler error:")[-1].strip()
    detail = re.split(r"\.\s|\n", text, maxsplit=1)[0][:160] if text else "no detail"
    return MokdError(f"checkpoint {path} cannot be read (truncated, corrupted or not a PyTorch/safetensors "
                     f"checkpoint): {type(error).__name__}: {detail}")


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return safetensors.torch.load_file(str(path), device="cpu"), {"origin": "safetensors", **metadata}
    except Exception as error:  # the safetensors reader has one error type for every defect
        raise _unreadable(path, error) from None


def _load_trusted(path: Path, blocked: str) -> tuple[Any, dict[str, Any]]:
    """Full unpickling, only ever reached with --trust-checkpoint and a file that needs it."""
    warnings.warn(f"{path}: unpickling with --trust-checkpoint (weights_only=False); the file may run code",
                  stacklevel=4)
    try:
        return torch.load(path, map_location="cpu", weights_only=False), {"origin": "torch", TRUSTED: True}
    except (ImportError, AttributeError) as error:  # the pickled code refers to a module or name we lack
        raise MokdError(f"checkpoint {path} cannot be unpickled even with --trust-checkpoint: it refers to "
                        f"{blocked}, which this environment cannot import ({type(error).__name__}: {error}); "
                        f"load it where that code is installed and re-save its state_dict") from None
    except Exception as error:
        raise _unreadable(path, error) from None


def load_object(path: str | os.PathLike, *, trust: bool = False) -> tuple[Any, dict[str, Any]]:
    """Unpickle tensors and containers only (the one place files are opened). Returns the object and what
    the file itself says: `origin` and, for safetensors, its metadata."""
    path = Path(path)
    _check_is_file(path)
    if _is_safetensors(path):
        return _load_safetensors(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True), {"origin": "torch"}
    except pickle.UnpicklingError as error:
        blocked = _blocked_global(str(error))
        if blocked is None:
            raise _unreadable(path, error) from None
        if not trust:
            raise MokdError(f"checkpoint {path} was refused by the safe loader: it contains the Python global "
                            f"{blocked}, which unpickling would import and may run as code; pass "
                            f"--trust-checkpoint to run it, only if you trust the file's source") from None
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError... for damaged files
        raise _unreadable(path, error) from None
    return _load_trusted(path, blocked)


def load_resume_state(path: Path, keys: set[str]) -> dict[str, Any]:
    """A per-epoch resume file that mokd wrote (`linear`, fine-tuning), holding at least `keys`: loaded with
    tensors and containers only, never trusted; a damaged or foreign file is a one-line error saying how to
    start that training over."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for damaged files
        blocked = _blocked_global(str(error)) if isinstance(error, pickle.UnpicklingError) else None
        reason = (f"it holds the Python global {blocked}, which no resume file of mokd holds" if blocked
                  else f"truncated or corrupted: {type(error).__name__}")
    else:
        missing = sorted(keys - set(state)) if isinstance(state, dict) else sorted(keys)
        reason = f"not a mokd resume file: it lacks {', '.join(missing)}" if missing else ""
    if reason:
        raise MokdError(f"cannot resume from {path} ({reason}); delete it to start that training afresh, "
                        "or drop --resume")
    return state


def _blocked_global(message: str) -> str | None:
    """The global the weights-only unpickler refused, from its message (its wording varies across torch
    releases: "GLOBAL x.y was not an allowed global", "unsupported GLOBAL x.y whose module x is blocked")."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return match.group(1) if match else None


# ---------------------------------------------------------------------------------------------
# Recognising the layout


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_module(state: Mapping[str, Any], where: str) -> dict[str, Any]:
    stripped = {name.removeprefix(MODULE_PREFIX): value for name, value in state.items()}
    if len(stripped) != len(state):
        raise MokdError(f"{where} holds the same tensor with and without the 'module.' prefix: "
                        "it cannot be loaded unambiguously")
    return stripped


def _name_prefixes(names: list[str] | Mapping[str, Any]) -> list[str]:
    """Distinct first name components, in order of appearance, e.g. ['backbone.', 'head.']."""
    return list(dict.fromkeys(name.split(".", 1)[0] + "." for name in names))


def _epoch_of(obj: Mapping[str, Any]) -> int | None:
    epoch = obj.get("epoch")
    if isinstance(epoch, torch.Tensor) and epoch.numel() == 1:
        return int(epoch.item())
    return int(epoch) if isinstance(epoch, int) else None


def _split_flat_state(state: Mapping[str, torch.Tensor], fmt: str, path: Path) -> _Layout:
    """A flat state dict: MoCo's query/key encoders when present, else one model."""
    stripped = _strip_module(state, str(path))
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
        top = _name_prefixes(obj)
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


# ---------------------------------------------------------------------------------------------
# Splitting an entry and inferring its architecture


def _split_backbone(where: str, full: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Backbone tensors (prefix-stripped) and the names of head tensors set aside.

    Two layouts: wrapped (`backbone.*` next to `head.*`/`transhead.*`, as DINO and MOKD save) and flat
    (timm/torchvision names, classifier in `fc.*` or `head.*`).
    """
    wrapped = any(name.startswith(f"{BACKBONE}.") for name in full)
    if wrapped:
        unknown = [p for p in _name_prefixes(full) if p[:-1] not in (BACKBONE, *HEAD_PREFIXES)]
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
        raise MokdError(f"{where} holds no backbone tensors (prefixes: {', '.join(_name_prefixes(full)[:6])}): "
                        "pick another model with --key")
    return backbone, heads


def _block_count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({name[len(prefix):].split(".", 1)[0] for name in state if name.startswith(prefix)})


def _pos_embed_grid(state: Mapping[str, torch.Tensor], where: str) -> int:
    """Side of the square patch grid the position embedding was trained for (one class token first)."""
    pos_embed = state["pos_embed"]
    tokens = pos_embed.shape[1] - 1 if pos_embed.ndim == 3 else -1
    grid = math.isqrt(tokens) if tokens > 0 else 0
    if grid * grid != tokens or grid == 0:
        raise MokdError(f"{where}: pos_embed of shape {list(pos_embed.shape)} is not one class token plus a "
                        "square patch grid; only square ViTs with a class token are supported")
    return grid


def _infer_resnet(state: Mapping[str, torch.Tensor], where: str) -> ArchSpec:
    bottleneck = "layer1.0.conv3.weight" in state
    layers = tuple(_block_count(state, f"layer{stage}.") for stage in range(1, 5))
    if 0 in layers:
        raise MokdError(f"{where}: ResNet with blocks per stage {list(layers)}: all four stages are required")
    first_convs = [state.get(f"layer{stage}.0.conv1.weight") for stage in range(1, 5)]
    if any(conv is None for conv in first_convs):
        raise MokdError(f"{where}: a ResNet stage has no block 0 (layerN.0.conv1.weight): the state dict is incomplete")
    widths = tuple(conv.shape[0] for conv in first_convs)
    stems = {7: "imagenet", 3: "cifar"}
    kernel = state["conv1.weight"].shape[-1]
    if kernel not in stems:
        raise MokdError(f"{where}: ResNet stem with a {kernel}x{kernel} conv1 is not supported (7x7 or 3x3)")
    stem = stems[kernel]
    for alias in ALIASES.values():
        if not alias.is_vit and (alias.layers, alias.bottleneck, alias.widths, alias.stem) == (
                layers, bottleneck, widths, stem):
            return alias
    return ArchSpec(name=f"resnet[{','.join(map(str, layers))}]", family="resnet", layers=layers,
                    bottleneck=bottleneck, widths=widths, stem=stem, img_size=32 if stem == "cifar" else 224)


def _assumed_heads(embed_dim: int) -> int:
    """State dicts do not store the head count: take the divisor of embed_dim whose head width is closest
    to 64 -- exactly embed_dim / 64 for tiny/small/base. `--model` overrides the guess."""
    divisors = [heads for heads in range(1, embed_dim + 1) if embed_dim % heads == 0]
    return min(divisors, key=lambda heads: abs(embed_dim / heads - VIT_HEAD_DIM))


def _infer_vit(state: Mapping[str, torch.Tensor], where: str) -> ArchSpec:
    if "fc_norm.weight" in state:
        raise MokdError(f"{where}: ViT with fc_norm (timm's average-pooled layout, e.g. fine-tuned MAE) has no final "
                        "norm for the class token; only class-token ViTs are supported")
    if "pos_embed" not in state:
        raise MokdError(f"{where}: ViT without pos_embed: cannot tell its image size")
    dim = state["cls_token"].shape[-1]
    depth = _block_count(state, "blocks.")
    kernel = state["patch_embed.proj.weight"].shape[-2:]
    if kernel[0] != kernel[1]:
        raise MokdError(f"{where}: non-square patches {list(kernel)} are not supported")
    patch = kernel[0]
    grid = _pos_embed_grid(state, where)
    for alias in ALIASES.values():
        if alias.is_vit and (alias.embed_dim, alias.depth, alias.patch_size) == (dim, depth, patch):
            return dataclasses.replace(alias, img_size=grid * patch)
    return ArchSpec(name=f"vit[dim={dim},depth={depth},patch={patch}]", family="vit", embed_dim=dim, depth=depth,
                    num_heads=_assumed_heads(dim), patch_size=patch, img_size=grid * patch)


def infer_arch(state: Mapping[str, torch.Tensor], *, where: str = "state dict") -> ArchSpec:
    """The ArchSpec a prefix-stripped backbone state dict was made from, read off tensor shapes.

    ViT heads cannot be read off tensors: they are assumed to be 64 wide (the tiny/small/base
    convention, see `_assumed_heads`); `--model` overrides that.
    """
    if "cls_token" in state and "patch_embed.proj.weight" in state:
        return _infer_vit(state, where)
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        return _infer_resnet(state, where)
    first = ", ".join(list(state)[:5])
    raise MokdError(f"{where}: unknown backbone layout (neither a ResNet nor a ViT); first tensors: {first}; "
                    "pick another model with --key")


def _make_entry(path: Path, key: str, tensors: Any, stored: ArchSpec | None) -> ModelEntry:
    where = f"{path} '{key}'"
    if not isinstance(tensors, Mapping) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise MokdError(f"{where} is not a state dict of tensors: the checkpoint is damaged or of another kind")
    full = _strip_module(tensors, where)
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


# ---------------------------------------------------------------------------------------------
# Building and strictly loading backbones


@dataclass
class _Mismatch:
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


def _compare(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> _Mismatch:
    """Key and shape differences, computed before load_state_dict so the error can be one line."""
    shapes = [f"{name}: file {list(found[name].shape)} vs model {list(tensor.shape)}"
              for name, tensor in expected.items() if name in found and found[name].shape != tensor.shape]
    return _Mismatch(missing=[n for n in expected if n not in found],
                     unexpected=[n for n in found if n not in expected], shapes=shapes)


def _build_spec(spec: ArchSpec, state: Mapping[str, torch.Tensor], where: str) -> ArchSpec:
    """The spec to build: a ViT keeps the position-embedding grid of the file (no resampling on load)."""
    if spec.is_vit and "pos_embed" in state:
        return dataclasses.replace(spec, img_size=_pos_embed_grid(state, where) * spec.patch_size)
    return spec


def _arch_note(entry: ModelEntry, spec: ArchSpec, forced: bool) -> str:
    if forced:
        return f"--model: {spec.describe()}"
    if entry.inferred:
        heads = f"; heads assumed {VIT_HEAD_DIM} wide" if spec.is_vit else ""
        return f"inferred: {spec.describe()}{heads}"
    return f"stored: {spec.describe()}"


def _head_groups(head_keys: list[str]) -> list[str]:
    """['head.*', 'transhead.*'] -- where the set-aside tensors live, for reports."""
    groups = []
    for name in head_keys:
        parts = name.split(".")
        depth = next(i for i, part in enumerate(parts) if part in HEAD_PREFIXES)
        groups.append(".".join(parts[:depth + 1]) + ".*")
    return list(dict.fromkeys(groups))


def _uninitialised_backbone(spec: ArchSpec) -> nn.Module:
    """`spec` on CPU without random init: initialising a ViT costs seconds and the strict load overwrites
    every tensor anyway -- provided all of them are in the state dict, which is checked here."""
    with torch.device("meta"):
        module = build_backbone(spec)
    module = module.to_empty(device="cpu")
    tensors = {name for name, _ in module.named_parameters()} | {name for name, _ in module.named_buffers()}
    not_saved = tensors - set(module.state_dict())
    if not_saved:
        raise RuntimeError(f"{spec.name} has tensors a state dict does not restore: {sorted(not_saved)[:3]}")
    return module


def _strict_module(ckpt: CheckpointFile, entry: ModelEntry, spec: ArchSpec) -> nn.Module:
    """Build `spec` and load the entry's backbone strictly, after a readable one-line key/shape check."""
    module = _uninitialised_backbone(spec)
    mismatch = _compare(module.state_dict(), entry.backbone_state)
    if mismatch:
        raise MokdError(f"{ckpt.path} '{entry.key}' does not match {spec.describe()}: {mismatch.describe()}; "
                        f"prefixes in '{entry.key}': {', '.join(_name_prefixes(entry.full_state)[:6])}; "
                        f"models in the file: {', '.join(ckpt.entries)}; "
                        "hint: choose the model with --key or the architecture with --model")
    module.load_state_dict(entry.backbone_state, strict=True)
    return module.eval()


def _load_entry(ckpt: CheckpointFile, entry: ModelEntry, model: str | None, img_size: int | None) -> LoadedBackbone:
    built = _build_spec(resolve_arch(model) if model else entry.spec, entry.backbone_state,
                        f"{ckpt.path} '{entry.key}'")
    check_image_size(img_size, built)
    module = _strict_module(ckpt, entry, built)
    count = len(entry.backbone_state)
    heads = (f"set aside {len(entry.head_keys)} head tensors ({', '.join(_head_groups(entry.head_keys))})"
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


def _numel(tensors: Mapping[str, torch.Tensor], names: set[str] | list[str]) -> int:
    return sum(tensors[name].numel() for name in names if name in tensors)


def _describe_entry(entry: ModelEntry) -> dict[str, Any]:
    with torch.device("meta"):
        reference = build_backbone(_build_spec(entry.spec, entry.backbone_state, f"'{entry.key}'"))
    params = {name for name, _ in reference.named_parameters()}
    buffers = {name for name, _ in reference.named_buffers()}
    return {
        "key": entry.key,
        "arch": entry.spec.name,
        "describe": entry.spec.describe(),
        "arch_spec": entry.spec.to_dict(),
        "inferred": entry.inferred,
        "matches_arch": not _compare(reference.state_dict(), entry.backbone_state),
        "backbone_tensors": len(entry.backbone_state),
        "backbone_params": _numel(entry.backbone_state, params),
        "backbone_buffer_numel": _numel(entry.backbone_state, buffers),
        "head_tensors": len(entry.head_keys),
        "head_params": _numel(entry.full_state, entry.head_keys),
        "head_prefixes": _head_groups(entry.head_keys),
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
