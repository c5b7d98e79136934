"""Checkpoint builders for the tests (the fixtures in conftest.py hand them out).

Builders: small files in every layout mokd reads (official MOKD, DINO, MoCo, mokd's own,
plain state dicts), made from timm backbones the tests keep to compare weights and outputs against.
Head tensors are fakes with the right names: the loader only recognises and sets them aside.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mokd.core.registry import ArchSpec, meta_backbone

FAKE_HEAD_HIDDEN = 16
FAKE_HEAD_OUT = 32


def make_source_backbone(spec: ArchSpec, seed: int = 0) -> nn.Module:
    """A timm backbone in eval mode with random weights and random BatchNorm statistics, so that a
    loader which forgot the buffers would be caught. Filled with `normal_` instead of timm's init,
    which takes seconds for a ViT on CPU."""
    model = meta_backbone(spec).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.05, generator=generator)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.num_batches_tracked.fill_(seed + 3)
    return model.eval()


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + name: tensor for name, tensor in state.items()}


def fake_mlp_head(in_dim: int) -> dict[str, torch.Tensor]:
    """DINO-head tensor names (mlp.0/2/4 and a weight-normalised last layer), small sizes."""
    return {
        "mlp.0.weight": torch.randn(FAKE_HEAD_HIDDEN, in_dim), "mlp.0.bias": torch.randn(FAKE_HEAD_HIDDEN),
        "mlp.2.weight": torch.randn(FAKE_HEAD_HIDDEN, FAKE_HEAD_HIDDEN), "mlp.2.bias": torch.randn(FAKE_HEAD_HIDDEN),
        "mlp.4.weight": torch.randn(8, FAKE_HEAD_HIDDEN), "mlp.4.bias": torch.randn(8),
        "last_layer.weight_g": torch.ones(FAKE_HEAD_OUT, 1), "last_layer.weight_v": torch.randn(FAKE_HEAD_OUT, 8),
    }


def fake_transhead(dim: int, cnn_channels: int | None) -> dict[str, torch.Tensor]:
    """MOKD T-Head tensor names: a 1x1 projection for CNN inputs, one block, final norm, last layer."""
    tensors = {
        "pos_embed": torch.randn(1, 4, dim),
        "blocks.0.norm1.weight": torch.randn(dim), "blocks.0.attn.qkv.weight": torch.randn(3 * dim, dim),
        "norm.weight": torch.randn(dim), "norm.bias": torch.randn(dim),
        "last_layer.weight_g": torch.ones(FAKE_HEAD_OUT, 1), "last_layer.weight_v": torch.randn(FAKE_HEAD_OUT, dim),
    }
    if cnn_channels is not None:
        tensors["patch_embed.weight"] = torch.randn(dim, cnn_channels, 1, 1)
        tensors["patch_embed.bias"] = torch.randn(dim)
    return tensors


def network_state(model: nn.Module, spec: ArchSpec, transhead_dim: int | None = None) -> dict[str, torch.Tensor]:
    """`backbone.*` + `head.*` (+ `transhead.*`), the layout DINO and MOKD wrap their networks in."""
    state = {**prefixed(model.state_dict(), "backbone."), **prefixed(fake_mlp_head(spec.feature_dim), "head.")}
    if transhead_dim is not None:
        cnn_channels = None if spec.is_vit else spec.feature_dim
        state.update(prefixed(fake_transhead(transhead_dim, cnn_channels), "transhead."))
    return state


def fake_optimizer_state() -> dict[str, Any]:
    return {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}


class CheckpointFactory:
    """Writes checkpoints into one directory; each method returns (path, {key: source backbone})."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @staticmethod
    def backbone(spec: ArchSpec, seed: int = 0) -> nn.Module:
        """A source backbone for hand-made checkpoints (see `make_source_backbone`)."""
        return make_source_backbone(spec, seed)

    def save(self, obj: Any, name: str) -> Path:
        path = self.directory / name
        torch.save(obj, path)
        return path

    def official_mokd(self, cnn_spec: ArchSpec, vit_spec: ArchSpec,
                      name: str = "mokd_resnet.vit_pretrain_exp_temp.pth") -> tuple[Path, dict[str, nn.Module]]:
        """Official MOKD: `module.` on every model but teacher_vit, arch strings, centers, optimizers."""
        models = {"student_cnn": make_source_backbone(cnn_spec, 1), "teacher_cnn": make_source_backbone(cnn_spec, 2),
                  "student_vit": make_source_backbone(vit_spec, 3), "teacher_vit": make_source_backbone(vit_spec, 4)}
        dim = vit_spec.embed_dim
        ckpt: dict[str, Any] = {}
        for key, model in models.items():
            spec = cnn_spec if key.endswith("cnn") else vit_spec
            state = network_state(model, spec, transhead_dim=dim)
            ckpt[key] = state if key == "teacher_vit" else prefixed(state, "module.")
        ckpt.update(optimizer_cnn=fake_optimizer_state(), optimizer_vit=fake_optimizer_state(), epoch=7,
                    arch_cnn="resnet_tiny", arch_vit="vit_tiny")
        for loss in ("cnn_mlp", "cnn_trans", "vit_mlp", "vit_trans", "cross_cnn", "cross_vit"):
            ckpt[f"loss_{loss}_fn"] = {"center": torch.zeros(1, FAKE_HEAD_OUT)}
        return self.save(ckpt, name), models

    def dino(self, spec: ArchSpec, name: str = "dino_checkpoint.pth") -> tuple[Path, dict[str, nn.Module]]:
        """DINO: ViT teacher unprefixed, ResNet teacher and every student under `module.`; argparse args."""
        models = {"teacher": make_source_backbone(spec, 5), "student": make_source_backbone(spec, 6)}
        teacher = network_state(models["teacher"], spec)
        ckpt = {
            "teacher": teacher if spec.is_vit else prefixed(teacher, "module."),
            "student": prefixed(network_state(models["student"], spec), "module."),
            "optimizer": fake_optimizer_state(), "epoch": 12,
            "args": argparse.Namespace(arch=spec.name, patch_size=spec.patch_size, out_dim=FAKE_HEAD_OUT, lr=5e-4),
            "dino_loss": {"center": torch.zeros(1, FAKE_HEAD_OUT)},
        }
        return self.save(ckpt, name), models

    def moco(self, spec: ArchSpec, *, mlp: bool = True,
             name: str = "moco_checkpoint.pth.tar") -> tuple[Path, dict[str, nn.Module]]:
        """MoCo v1/v2: `module.encoder_q.*` / `module.encoder_k.*` with an fc head, plus the queue."""
        models = {"encoder_q": make_source_backbone(spec, 7), "encoder_k": make_source_backbone(spec, 8)}
        if mlp:  # v2: Linear-ReLU-Linear
            fc = {"fc.0.weight": torch.randn(FAKE_HEAD_HIDDEN, spec.feature_dim),
                  "fc.0.bias": torch.randn(FAKE_HEAD_HIDDEN),
                  "fc.2.weight": torch.randn(8, FAKE_HEAD_HIDDEN), "fc.2.bias": torch.randn(8)}
        else:  # v1: one Linear
            fc = {"fc.weight": torch.randn(8, spec.feature_dim), "fc.bias": torch.randn(8)}
        state: dict[str, torch.Tensor] = {}
        for key, model in models.items():
            state.update(prefixed({**model.state_dict(), **fc}, f"module.{key}."))
        state.update({"module.queue": torch.randn(8, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
        ckpt = {"epoch": 200, "arch": "resnet_tiny", "state_dict": state, "optimizer": fake_optimizer_state()}
        return self.save(ckpt, name), models

    def mokd_native(self, spec1: ArchSpec, spec2: ArchSpec | None = None, name: str = "mokd_native.pth",
                    config: dict[str, Any] | None = None) -> tuple[Path, dict[str, nn.Module]]:
        """mokd's trainer layout: `mokd_format`, stored ArchSpecs, teacherN/studentN without `module.`."""
        specs = {"1": spec1} if spec2 is None else {"1": spec1, "2": spec2}
        dim = max(spec.embed_dim for spec in specs.values()) or 64
        ckpt: dict[str, Any] = {"mokd_format": 1, "archs": {i: s.to_dict() for i, s in specs.items()}, "epoch": 3,
                                "mode": "pair" if spec2 is not None else "single", "config": config or {"epochs": 10, "lr": 0.1},
                                "optimizer1": fake_optimizer_state(), "centers": {"mlp1": torch.zeros(1, 8)},
                                "rng": {"torch": torch.get_rng_state()}}
        models: dict[str, nn.Module] = {}
        for index, spec in specs.items():
            for role, seed in (("teacher", 10), ("student", 20)):
                model = make_source_backbone(spec, seed + int(index))
                models[f"{role}{index}"] = model
                ckpt[f"{role}{index}"] = network_state(model, spec, transhead_dim=dim)
        return self.save(ckpt, name), models
