"""The official MOKD step on multi-size crops, written out again from the method spec, against MokdPair.

The reference below is functional code over the pair's state dicts: torchvision's ResNet for the CNN, its own
ViT, MLP-Head and T-Head forwards, its own position resize (bicubic by scale factor with the +0.1 offset), the
search over global crop 1 repeated per local crop, and DINO's multi-crop cross-entropy with centers and the
official temperature schedules. It calls none of the project's resize, T-Head or loss code. The networks keep
the official grids (ViT backbone 14x14, T-Heads 14x14 / 7x7: `position_size = 224`) while the crops are 64 px
(globals) and 32 px (locals), so every term but the CNN's sm sees a resized embedding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import resample_abs_pos_embed

from mokd_train.config import TrainConfig, arch_specs
from mokd_train.pair import MokdPair, PairConfig

B, N_LOCAL, K = 2, 3, 64
GLOBAL_SIZE, LOCAL_SIZE, POSITION_SIZE = 64, 32, 224
EPOCH, EPOCHS, STUDENT_TEMP = 10, 100, 0.1
VIT_HEADS, THEAD_HEADS, THEAD_DEPTH = 3, 6, 3
TERMS = [f"{term}{model}" for model in "12" for term in ("sm", "st", "cm", "ct")]
Resize = Callable[[torch.Tensor, int, int], torch.Tensor]


# ---------------------------------------------------------------- position resizes (1×N×D grid -> 1×(h·w)×D)

def official_resize(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """DINO's / MOKD's `interpolate_pos_encoding`: bicubic by scale factor (h + 0.1)/√N, untouched if it fits."""
    count, dim = grid.shape[1], grid.shape[2]
    if count == height * width and height == width:
        return grid
    side = math.sqrt(count)
    square = grid.reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    resized = F.interpolate(square, scale_factor=((height + 0.1) / side, (width + 0.1) / side), mode="bicubic")
    assert resized.shape[-2:] == (height, width)
    return resized.permute(0, 2, 3, 1).reshape(1, height * width, dim)


def timm_resize(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """timm's dynamic resize (to a size, antialiased): what the official code does NOT do."""
    side = math.isqrt(grid.shape[1])
    if side * side == height * width and height == width:
        return grid
    return resample_abs_pos_embed(grid, new_size=[height, width], old_size=[side, side], num_prefix_tokens=0,
                                  interpolation="bicubic", antialias=True)


# ---------------------------------------------------------------- functional networks over a state dict

def sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def layer_norm(x: torch.Tensor, p: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-6)


def transformer_block(x: torch.Tensor, p: dict[str, torch.Tensor], heads: int) -> torch.Tensor:
    """Pre-norm ViT block: x + attn(LN(x)), then x + MLP(LN(x)) with exact GELU."""
    batch, count, dim = x.shape
    qkv = F.linear(layer_norm(x, p, "norm1"), p["attn.qkv.weight"], p["attn.qkv.bias"])
    q, k, v = qkv.reshape(batch, count, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    attention = torch.softmax(q @ k.transpose(-2, -1) * (dim // heads) ** -0.5, dim=-1)
    mixed = (attention @ v).transpose(1, 2).reshape(batch, count, dim)
    x = x + F.linear(mixed, p["attn.proj.weight"], p["attn.proj.bias"])
    hidden = F.gelu(F.linear(layer_norm(x, p, "norm2"), p["mlp.fc1.weight"], p["mlp.fc1.bias"]))
    return x + F.linear(hidden, p["mlp.fc2.weight"], p["mlp.fc2.bias"])


def weight_norm_linear(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    v, g = p["last_layer.weight_v"], p["last_layer.weight_g"]
    return F.linear(x, g * v / v.norm(dim=1, keepdim=True))


def mlp_head(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """DINO head: Linear-GELU-Linear-GELU-Linear, L2-normalise, weight-normalised Linear to K."""
    x = F.gelu(F.linear(x, p["mlp.0.weight"], p["mlp.0.bias"]))
    x = F.gelu(F.linear(x, p["mlp.2.weight"], p["mlp.2.bias"]))
    x = F.normalize(F.linear(x, p["mlp.4.weight"], p["mlp.4.bias"]), dim=-1)
    return weight_norm_linear(x, p)


def vit(p: dict[str, torch.Tensor], images: torch.Tensor, resize: Resize, patch: int = 16) -> torch.Tensor:
    """DINO's ViT: all tokens after the final LayerNorm; the 14x14 grid resized for the input."""
    x = F.conv2d(images, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=patch)
    height, width = x.shape[-2:]
    x = torch.cat([p["cls_token"].expand(len(images), -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    position = torch.cat([p["pos_embed"][:, :1], resize(p["pos_embed"][:, 1:], height, width)], dim=1)
    x = x + position
    for index in range(sum(key.endswith("norm1.weight") for key in p)):
        x = transformer_block(x, sub(p, f"blocks.{index}."), VIT_HEADS)
    return layer_norm(x, p, "norm")


def resnet(p: dict[str, torch.Tensor], images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's ResNet-18 (eval mode) with these weights: (pooled vector, layer4 map)."""
    model = torchvision.models.resnet18()
    model.load_state_dict({**p, "fc.weight": model.fc.weight, "fc.bias": model.fc.bias})
    model.eval()
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    feature_map = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return torch.flatten(model.avgpool(feature_map), 1), feature_map


def thead(p: dict[str, torch.Tensor], features: torch.Tensor, resize: Resize,
          query: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MOKD's T-Head: a CNN map (B×C×h×w, 1x1 conv) or ViT patch tokens (B×N×D), + resized position grid, the
    optional query token first, 3 blocks, LN, query dropped, mean, weight-normalised FC. Returns
    (logits, x_pool: the mean of the projected CNN map, None for ViT tokens)."""
    if features.ndim == 4:
        projected = F.conv2d(features, p["patch_embed.weight"], p["patch_embed.bias"])
        height, width = projected.shape[-2:]
        x_pool = projected.mean(dim=(2, 3))
        tokens = projected.flatten(2).transpose(1, 2)
    else:
        height = width = math.isqrt(features.shape[1])
        x_pool, tokens = None, features
    x = tokens + resize(p["pos_embed"], height, width)
    if query is not None:
        x = torch.cat([query.unsqueeze(1), x], dim=1)
    for index in range(THEAD_DEPTH):
        x = transformer_block(x, sub(p, f"blocks.{index}."), THEAD_HEADS)
    x = layer_norm(x, p, "norm")
    if query is not None:
        x = x[:, 1:]
    return weight_norm_linear(x.mean(dim=1), p), x_pool


# ---------------------------------------------------------------- the official step

def temperature(epoch: int, warmup_epochs: int) -> float:
    schedule = np.concatenate((np.linspace(0.04, 0.07, warmup_epochs), np.ones(EPOCHS - warmup_epochs) * 0.07))
    return float(schedule[epoch])


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """DINOLoss.forward: every (teacher global i, student view v != i) pair, averaged."""
    student_views = (student / STUDENT_TEMP).chunk(2 + N_LOCAL)
    targets = F.softmax((teacher - center) / teacher_temp, dim=-1).chunk(2)
    losses = [torch.sum(-q * F.log_softmax(student_views[v], dim=-1), dim=-1).mean()
              for i, q in enumerate(targets) for v in range(len(student_views)) if v != i]
    return sum(losses) / len(losses)


def search_loss(student: torch.Tensor, target: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """CTSearchLoss: row-wise cross-entropy to the sharpened, uncentered search output."""
    q = F.softmax(target / teacher_temp, dim=-1)
    return torch.sum(-q * F.log_softmax(student / STUDENT_TEMP, dim=-1), dim=-1).mean()


@torch.no_grad()
def official_terms(states: dict[str, dict[str, torch.Tensor]], centers: dict[str, torch.Tensor],
                   crops: list[torch.Tensor], resize: Resize) -> dict[str, float]:
    """The 8 terms of the official train_one_epoch for model 1 = ResNet-18, model 2 = ViT-T/16."""
    groups = [torch.cat(crops[:2]), torch.cat(crops[2:])]  # the official code runs globals, then locals
    cnn, cnn_teacher, vit_student, vit_teacher = (states[name] for name in ("student1", "teacher1", "student2",
                                                                             "teacher2"))
    s_cnn_m, s_cnn_t, s_vit_m, s_vit_t = [], [], [], []
    for images in groups:
        pooled, feature_map = resnet(sub(cnn, "backbone."), images)
        s_cnn_m.append(mlp_head(sub(cnn, "head."), pooled))
        logits, s_cnn_out = thead(sub(cnn, "transhead."), feature_map, resize)
        s_cnn_t.append(logits)
        tokens = vit(sub(vit_student, "backbone."), images, resize)
        s_vit_m.append(mlp_head(sub(vit_student, "head."), tokens[:, 0]))
        s_vit_t.append(thead(sub(vit_student, "transhead."), tokens[:, 1:], resize)[0])
        s_vit_out = tokens[:, 0]
    # the last loop pass ran the locals: s_cnn_out / s_vit_out are the local crops' search queries
    s_cnn_t_local, s_vit_t_local = s_cnn_t[1], s_vit_t[1]
    s_cnn_m, s_cnn_t, s_vit_m, s_vit_t = (torch.cat(x) for x in (s_cnn_m, s_cnn_t, s_vit_m, s_vit_t))

    pooled, feature_map = resnet(sub(cnn_teacher, "backbone."), groups[0])
    t_cnn_m = mlp_head(sub(cnn_teacher, "head."), pooled)
    t_cnn_t = thead(sub(cnn_teacher, "transhead."), feature_map, resize)[0]
    t_cnn_search = thead(sub(cnn_teacher, "transhead."), feature_map.chunk(2)[0].repeat(N_LOCAL, 1, 1, 1), resize,
                         query=s_vit_out)[0]
    tokens = vit(sub(vit_teacher, "backbone."), groups[0], resize)
    t_vit_m = mlp_head(sub(vit_teacher, "head."), tokens[:, 0])
    t_vit_t = thead(sub(vit_teacher, "transhead."), tokens[:, 1:], resize)[0]
    t_vit_search = thead(sub(vit_teacher, "transhead."), tokens[:, 1:].chunk(2)[0].repeat(N_LOCAL, 1, 1), resize,
                         query=s_cnn_out)[0]

    cnn_self, shared = temperature(EPOCH, 50), temperature(EPOCH, 30)  # the code's CNN self-term quirk
    terms = {
        "sm1": dino_loss(s_cnn_m, t_cnn_m, centers["sm1"], cnn_self),
        "st1": dino_loss(s_cnn_t, t_cnn_t, centers["st1"], cnn_self),
        "cm1": dino_loss(s_cnn_m, t_vit_m, centers["cm1"], shared),
        "ct1": search_loss(s_cnn_t_local, t_vit_search, shared),
        "sm2": dino_loss(s_vit_m, t_vit_m, centers["sm2"], shared),
        "st2": dino_loss(s_vit_t, t_vit_t, centers["st2"], shared),
        "cm2": dino_loss(s_vit_m, t_cnn_m, centers["cm2"], shared),
        "ct2": search_loss(s_vit_t_local, t_cnn_search, shared),
    }
    return {name: float(value) for name, value in terms.items()}


# ---------------------------------------------------------------- the comparison

@pytest.fixture(scope="module")
def setup():
    """The pair with the official grids, weights made distinctive (large position grids, teachers != students,
    BN statistics and centers not at their defaults), eval mode; its 8 terms on 64 / 32 px crops."""
    specs = arch_specs(TrainConfig(arch1="r18", arch2="vit_t", patch_size=16, img_size=GLOBAL_SIZE,
                                   local_size=LOCAL_SIZE, position_size=POSITION_SIZE))
    torch.manual_seed(0)
    pair = MokdPair(*specs, PairConfig(out_dim=K, mlp_hidden_dim=64, mlp_bottleneck_dim=32, n_local=N_LOCAL,
                                       epochs=EPOCHS, vit_drop_path=0.0)).eval()
    with torch.no_grad():
        for network in (*pair.students, *pair.teachers):
            for name, tensor in network.named_parameters():
                if name.endswith("pos_embed"):
                    tensor.normal_()
            for name, tensor in network.named_buffers():
                if name.endswith("running_mean"):
                    tensor.normal_(std=0.1)
                elif name.endswith("running_var"):
                    tensor.uniform_(0.5, 1.5)
        for teacher in pair.teachers:
            for tensor in teacher.parameters():
                tensor.add_(0.05 * torch.randn_like(tensor) * tensor.std().nan_to_num(0.0))
        for center in pair.centers.buffers():
            center.normal_()
    generator = torch.Generator().manual_seed(1)
    crops = ([torch.randn(B, 3, GLOBAL_SIZE, GLOBAL_SIZE, generator=generator) for _ in range(2)]
             + [torch.randn(B, 3, LOCAL_SIZE, LOCAL_SIZE, generator=generator) for _ in range(N_LOCAL)])
    states = {name: network.state_dict() for name, network in
              zip(("student1", "teacher1", "student2", "teacher2"),
                  (pair.students[0], pair.teachers[0], pair.students[1], pair.teachers[1]))}
    centers = pair.centers_state_dict()
    with torch.no_grad():
        _, _, stats = pair.compute_losses(crops, EPOCH)
    return states, centers, crops, stats


def test_the_networks_keep_the_official_grids(setup):
    states = setup[0]
    assert states["student2"]["backbone.pos_embed"].shape == (1, 1 + 14 * 14, 192)
    assert states["student2"]["transhead.pos_embed"].shape == (1, 14 * 14, 192)
    assert states["teacher1"]["transhead.pos_embed"].shape == (1, 7 * 7, 192)


def test_every_term_equals_the_official_step(setup):
    states, centers, crops, stats = setup
    expected = official_terms(states, centers, crops, official_resize)
    differences = {name: abs(stats[name] - expected[name]) for name in TERMS}
    assert max(differences.values()) < 1e-4, differences


def resized_once_at_load(states: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """The grids as a load-time resize to the global-crop grid left them (ViT 4x4, CNN T-Head 2x2)."""
    changed = {}
    for name, state in states.items():
        state = dict(state)
        side = GLOBAL_SIZE // (16 if name.endswith("2") else 32)
        if "backbone.pos_embed" in state:
            stored = state["backbone.pos_embed"]
            state["backbone.pos_embed"] = torch.cat([stored[:, :1], official_resize(stored[:, 1:], side, side)], 1)
        state["transhead.pos_embed"] = official_resize(state["transhead.pos_embed"], side, side)
        changed[name] = state
    return changed


@pytest.mark.parametrize("variant", ["timm resize", "resized once at load"])
def test_the_check_has_power_a_wrong_resize_is_caught(setup, variant):
    states, centers, crops, stats = setup
    if variant == "timm resize":
        wrong = official_terms(states, centers, crops, timm_resize)
    else:
        wrong = official_terms(resized_once_at_load(states), centers, crops, official_resize)
    differences = {name: abs(stats[name] - wrong[name]) for name in TERMS}
    assert max(differences.values()) > 1e-3, differences
    assert differences["sm1"] < 1e-4  # the CNN's MLP terms never see a position embedding
