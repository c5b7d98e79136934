"""`mokd-eval export`: a checkpoint's backbone for other tools.

- `torchvision`: a ResNet state dict with torchvision's names (torchvision's `resnetNN()` with `fc` replaced by
  `nn.Identity()` loads it strictly: the backbone has no classifier).
- `timm`: the backbone state dict that `timm.create_model(name, num_classes=0)` loads strictly.
- `detectron2`: MoCo's converter naming (`stem.conv1`, `res2.0.conv1.norm`, `res3.0.shortcut`, ...) as a
  pickle of numpy arrays with `matching_heuristics: True`, ready for `MODEL.WEIGHTS`.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mokd.core import atomic
from mokd.core.checkpoints import LoadedBackbone
from mokd.core.errors import MokdError
from mokd.core.pipeline import RunSettings, load_models, model_record
from mokd.core.registry import resolve_arch
from mokd.core.results import build_results

FORMATS = ("detectron2", "torchvision", "timm")
TIMM_RESNETS = {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet34", (3, 4, 23, 3): "resnet101",
                (3, 8, 36, 3): "resnet152"}
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def timm_name(loaded: LoadedBackbone) -> str:
    """The timm model name whose `num_classes=0` variant has exactly these tensors."""
    spec = loaded.spec
    if spec.is_vit:
        return f"vit_{'tiny' if spec.embed_dim == 192 else 'small' if spec.embed_dim == 384 else 'base'}" \
               f"_patch{spec.patch_size}_{spec.img_size}"
    if spec.layers == (3, 4, 6, 3) and spec.bottleneck:
        return "resnet50"
    return TIMM_RESNETS.get(spec.layers, spec.name)


def stock_model_name(loaded: LoadedBackbone, fmt: str) -> str | None:
    """The torchvision or timm model whose tensors are exactly these (names and shapes), checked by building it
    on the meta device; None when no stock model takes them (a CPU-sized or CIFAR-stem net, a custom width).
    detectron2 builds its ResNets like torchvision's."""
    import timm
    import torchvision

    name = timm_name(loaded)
    expected = {key: tuple(value.shape) for key, value in loaded.module.state_dict().items()}
    with torch.device("meta"):
        if fmt == "timm":
            model = timm.create_model(name, num_classes=0) if timm.is_model(name) else None
        else:
            model = getattr(torchvision.models, name)() if name in TORCHVISION_RESNETS else None
            if model is not None:
                model.fc = torch.nn.Identity()
    if model is None:
        return None
    return name if {key: tuple(value.shape) for key, value in model.state_dict().items()} == expected else None


def _overrides(loaded: LoadedBackbone) -> str:
    """resolve_arch's keyword arguments that rebuild `loaded.spec` from its name."""
    default = resolve_arch(loaded.spec.name)
    return "".join(f", {key}={getattr(loaded.spec, key)!r}" for key in ("img_size", "patch_size", "stem")
                   if getattr(loaded.spec, key) != getattr(default, key))


def detectron2_name(name: str) -> str | None:
    """MoCo's `convert-pretrain-to-detectron2.py` renaming of one torchvision ResNet tensor (None = dropped)."""
    if name.endswith("num_batches_tracked"):
        return None
    if name.startswith("conv1."):
        return "stem." + name
    if name.startswith("bn1."):
        return "stem.conv1.norm." + name[len("bn1."):]
    match = re.match(r"layer(\d)\.(\d+)\.(.+)$", name)
    if match is None:
        raise MokdError(f"tensor {name!r} is not part of a torchvision-layout ResNet: cannot name it for detectron2")
    stage, block, rest = int(match.group(1)) + 1, match.group(2), match.group(3)
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return f"res{stage}.{block}.{rest}"


def detectron2_state(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    renamed = {}
    for name, tensor in state.items():
        new = detectron2_name(name)
        if new is not None:
            renamed[new] = tensor.detach().cpu().numpy()
    return renamed


def export_backbone(loaded: LoadedBackbone, fmt: str, out: Path) -> dict[str, Any]:
    """Write one backbone in `fmt` and return a JSON-able summary of what was written."""
    if fmt not in FORMATS:
        raise MokdError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    state = {name: tensor.detach().cpu().clone() for name, tensor in loaded.module.state_dict().items()}
    if fmt in ("detectron2", "torchvision") and loaded.spec.is_vit:
        raise MokdError(f"--format {fmt} exports ResNets only; '{loaded.key}' is a ViT ({loaded.spec.name}): "
                        "use --format timm or pick a ResNet with --key")
    stock = stock_model_name(loaded, fmt)
    if fmt == "detectron2" and stock is None:
        raise MokdError(f"--format detectron2: '{loaded.key}' ({loaded.spec.describe()}) matches no torchvision "
                        "ResNet, so no detectron2 ResNet config can load it; use --format timm (loads into mokd's "
                        "own builder) instead")
    if fmt == "detectron2":
        payload = {"model": detectron2_state(state), "__author__": f"mokd export of {loaded.checkpoint.path.name}"
                   f" '{loaded.key}'", "matching_heuristics": True}
        atomic.write_bytes(out, pickle.dumps(payload))
        names = list(payload["model"])
    else:
        atomic.save_torch(state, out)
        names = list(state)
    if stock is None:
        target = (f"no stock {fmt} model has this architecture: mokd.core.registry.build_backbone("
                  f"mokd.core.registry.resolve_arch({loaded.spec.name!r}{_overrides(loaded)})).load_state_dict")
    else:
        target = {"detectron2": f"detectron2 MODEL.WEIGHTS of a ResNet-{stock[len('resnet'):]} (MoCo naming)",
                  "torchvision": f"torchvision.models.{stock}() with fc = Identity",
                  "timm": f"timm.create_model('{stock}', num_classes=0)"}[fmt]
    return {"key": loaded.key, "arch": loaded.spec.name, "format": fmt, "file": str(out), "tensors": len(names),
            "loads_into": target}


def run_export(checkpoint: Path, run: RunSettings, *, fmt: str, output: Path) -> dict[str, Any]:
    """Export the one model `run.key` selects (a pair needs --key) and return the results payload."""
    loaded = load_models(checkpoint, model=None, key=run.key, trust=run.trust, echo=run.echo)
    if len(loaded) > 1:
        raise MokdError(f"{checkpoint} holds {len(loaded)} models ({', '.join(e.key for e in loaded)}): "
                        "choose one with --key")
    summary = export_backbone(loaded[0], fmt, output)
    run.echo(f"wrote {summary['tensors']} tensors of '{summary['key']}' ({summary['arch']}) to {output}; "
             f"loads into {summary['loads_into']}")
    return build_results(command="export", protocol={"format": fmt}, dataset={},
                         results=[{**model_record(loaded[0]), "metrics": {}, "export": summary}], timings={},
                         seed=None, config={"checkpoint": str(checkpoint), "format": fmt, "output": str(output),
                                            "key": run.key})
