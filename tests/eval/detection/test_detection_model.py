"""The C4 Mask R-CNN rebuilt on torchvision: module shapes, detectron2's anchors and losses, norm presets,
and strict trunk/res5 loading from mokd and official-MOKD checkpoints."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from checkpoint_files import CheckpointFactory
from mokd.core.checkpoints import load_backbones
from mokd_eval.detection.model import (C4Trunk, D2AnchorGenerator, DetectorConfig, build_detector,
                                       d2_bottleneck_res5, roi_align_v2)
from mokd_eval.detection.train import param_groups
from mokd.core.registry import ALIASES, build_backbone, meta_backbone

R18 = ALIASES["r18"]
SMALL = DetectorConfig(num_classes=3, train_sizes=(64, 64), test_size=64, rois_per_image=8,
                       rpn_post_nms_topk=(20, 10), pooler_resolution=14)


@pytest.fixture(scope="module")
def r18_pair(tmp_path_factory, tiny_vit_spec):
    """One mokd pair checkpoint with an R18 net for the module's loading tests (they only read it)."""
    return CheckpointFactory(tmp_path_factory.mktemp("pair")).mokd_native(R18, tiny_vit_spec)


@pytest.fixture(scope="module")
def r18() -> nn.Module:
    torch.manual_seed(0)
    return build_backbone(R18)


def test_trunk_is_stride_16_with_res4_channels(r18):
    trunk = C4Trunk(r18).eval()
    assert trunk.out_channels == 256
    with torch.no_grad():
        out = trunk(torch.randn(1, 3, 96, 128))
    assert out.shape == (1, 256, 6, 8)
    r50 = C4Trunk(meta_backbone(ALIASES["r50"]))
    assert r50.out_channels == 1024


def test_res5_heads_pooled_14_to_7_and_predictor_shapes(r18):
    model, _ = build_detector(r18, SMALL)
    heads = model.roi_heads
    pooled = roi_align_v2(torch.randn(1, 256, 8, 8), [torch.tensor([[0.0, 0.0, 64.0, 64.0]])], 14)
    assert pooled.shape == (1, 256, 14, 14)
    res5 = heads.res5(pooled)
    assert res5.shape == (1, 512, 7, 7)
    assert isinstance(heads.res5.norm, nn.BatchNorm2d)  # MoCo's extra norm after res5 (syncbn preset)
    cls, box = heads.box_predictor(res5.mean(dim=(2, 3)))
    assert cls.shape == (1, 4) and box.shape == (1, 16)
    assert heads.mask_head(res5).shape == (1, 4, 14, 14)
    stock = d2_bottleneck_res5(256, 512)
    assert stock(pooled).shape == (1, 512, 7, 7) and len(stock) == 3
    assert stock[0].conv2.stride == (2, 2) and stock[0].conv1.stride == (1, 1)  # stride in the 3x3


def test_anchors_are_detectron2s_15_unrounded():
    generator = D2AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
    cell = generator.cell_anchors[0]
    assert cell.shape == (15, 4) and generator.num_anchors_per_location() == [15]
    # size 32, ratio h/w = 0.5: w = 32 / sqrt(0.5), h = 32 * sqrt(0.5), centred on 0 (detectron2 does not round)
    assert cell[0].tolist() == pytest.approx([-16 * math.sqrt(2), -8 * math.sqrt(2), 16 * math.sqrt(2),
                                              8 * math.sqrt(2)], abs=1e-4)
    assert (cell[:, 2] - cell[:, 0]) * (cell[:, 3] - cell[:, 1]) == pytest.approx(
        torch.tensor([32.0, 64, 128, 256, 512] * 3) ** 2, rel=1e-5)


def test_rpn_losses_are_l1_and_bce_summed_over_256_per_image(r18):
    model, _ = build_detector(r18, SMALL)
    rpn = model.rpn
    torch.manual_seed(1)
    labels = [torch.tensor([1.0] * 3 + [0.0] * 300 + [-1.0] * 10), torch.tensor([1.0] * 2 + [0.0] * 311)]
    objectness = torch.randn(626, 1)
    deltas, targets = torch.randn(626, 4), [torch.randn(313, 4), torch.randn(313, 4)]
    torch.manual_seed(2)
    obj_loss, box_loss = rpn.compute_loss(objectness, deltas, labels, targets)
    # few positives: all 5 are sampled, negatives fill to 256 per image
    flat, flat_targets = torch.cat(labels), torch.cat(targets)
    positive = torch.where(flat == 1)[0]
    assert box_loss.item() == pytest.approx(
        F.l1_loss(deltas[positive], flat_targets[positive], reduction="sum").item() / 512, rel=1e-6)
    torch.manual_seed(2)
    pos, neg = rpn.fg_bg_sampler(labels)
    sampled = torch.cat([torch.where(torch.cat(pos))[0], torch.where(torch.cat(neg))[0]])
    assert len(sampled) == 512
    expected = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], flat[sampled], reduction="sum") / 512
    assert obj_loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_training_and_inference_outputs(r18):
    model, _ = build_detector(r18, SMALL)
    image = torch.rand(3, 64, 64)
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 12:40] = 1
    target = {"boxes": torch.tensor([[12.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([2]), "masks": masks}
    losses = model.train()([image, image.flip(-1)], [target, target])
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        detections = model.eval()([torch.rand(3, 48, 80)])
    out = detections[0]
    assert out["masks"].shape[1:] == (1, 48, 80)  # pasted back at the input size
    assert len(out["boxes"]) <= SMALL.detections_per_image
    assert ((out["labels"] >= 1) & (out["labels"] <= 3)).all()


def test_frozenbn_preset_freezes_stem_and_res2(r18):
    model, _ = build_detector(r18, dataclasses.replace(SMALL, norm="frozenbn"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.backbone.bn1, FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in model.backbone.conv1.parameters())
    assert not any(p.requires_grad for p in model.backbone.layer1.parameters())
    assert all(p.requires_grad for p in model.backbone.layer2.parameters())
    assert torch.equal(model.backbone.layer2[0].bn1.running_var, r18.layer2[0].bn1.running_var)
    syncbn, _ = build_detector(r18, SMALL)
    assert all(p.requires_grad for p in syncbn.parameters())  # FREEZE_AT 0
    decay, no_decay = param_groups(syncbn, 1e-4)
    norm_params = {id(p) for m in syncbn.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in no_decay["params"]} == norm_params and no_decay["weight_decay"] == 0.0
    assert decay["weight_decay"] == 1e-4 and not norm_params & {id(p) for p in decay["params"]}


@pytest.mark.parametrize("layout", ["mokd", "official"])
def test_every_trunk_and_res5_tensor_loads_from_pair_checkpoints(r18_pair, checkpoint_factory, tiny_vit_spec, layout):
    if layout == "mokd":
        path, sources = r18_pair
        key = "teacher1"
    else:
        path, sources = checkpoint_factory.official_mokd(R18, tiny_vit_spec)
        key = "teacher_cnn"
    loaded = load_backbones(path, key=key)[0]
    file_state = loaded.checkpoint.entries[key].backbone_state
    model, report = build_detector(loaded.module, SMALL, file_state)
    n_trunk = len([n for n in file_state if not n.startswith(("layer4.", "fc."))])
    n_res5 = len([n for n in file_state if n.startswith("layer4.")])
    assert (report.trunk_loaded, report.trunk_total) == (n_trunk, n_trunk)  # 0 missing
    assert (report.res5_loaded, report.res5_total) == (n_res5, n_res5)
    assert "0 missing" in report.describe()
    source = sources[key]
    assert torch.equal(model.backbone.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    assert torch.equal(model.roi_heads.res5.blocks[1].bn2.running_mean, source.layer4[1].bn2.running_mean)


def test_d2_bottleneck_loads_by_name_and_shape_like_detectron2(r18_pair):
    """R18 BasicBlock layer4 into detectron2's 3-Bottleneck head: conv1 (3x3 vs 1x1) is skipped, conv2, the
    norms and the shortcut match by shape, conv3/bn3 and block 2 have no source tensor."""
    path, sources = r18_pair
    loaded = load_backbones(path, key="teacher1")[0]
    file_state = loaded.checkpoint.entries["teacher1"].backbone_state
    config = dataclasses.replace(SMALL, res5_head="d2-bottleneck")
    model, report = build_detector(loaded.module, config, file_state)
    assert report.res5_skipped == ["0.conv1.weight", "1.conv1.weight"]
    bn = 5  # weight, bias, running_mean, running_var, num_batches_tracked
    assert report.res5_loaded == (bn + 1 + bn + 1 + bn) + (bn + 1 + bn)  # block 0 with shortcut, block 1
    assert report.res5_total == len(d2_bottleneck_res5(256, 512).state_dict())
    res5 = model.roi_heads.res5.blocks
    source = sources["teacher1"].layer4
    assert torch.equal(res5[0].conv2.weight, source[0].conv2.weight)
    assert torch.equal(res5[0].downsample[0].weight, source[0].downsample[0].weight)
    assert torch.equal(res5[1].bn1.running_var, source[1].bn1.running_var)
    assert res5[0].conv1.weight.shape == (512, 256, 1, 1) and res5[2].conv3.weight.shape == (512, 512, 1, 1)
    assert "shape mismatches kept random: 0.conv1.weight, 1.conv1.weight" in report.describe()
