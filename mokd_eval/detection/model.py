"""detectron2's C4 Mask R-CNN, rebuilt from torchvision's detection components.

Trunk = stem + res2..res4 of the checkpoint's ResNet (stride 16); RPN on res4 with detectron2's anchors,
matching, sampling, top-k and its L1/BCE losses normalised by 256 x images; ROIAlignV2 (aligned=True)
14 x 14; res5 on the pooled features, the box predictor on its spatial mean and the 14 x 14 mask head on
the same res5 output (one res5 pass in training). Values: shared/specs/c4-detector.md.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import roi_align
from torchvision.ops.misc import FrozenBatchNorm2d

from mokd.core.data import IMAGENET_MEAN, IMAGENET_STD
from mokd.core.errors import MokdError

TRUNK_STRIDE = 16
TRUNK_PARTS = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3")
FROZEN_AT_2 = ("conv1", "bn1", "layer1")  # detectron2 FREEZE_AT 2: stem + res2
RES5_HEADS = ("native", "d2-bottleneck")
NORMS = ("syncbn", "frozenbn")
D2_BOTTLENECK_WIDTH = 512
MASK_HEAD_DIM = 256


@dataclass(frozen=True)
class DetectorConfig:
    """Every architectural and box-processing value; defaults are detectron2's (R-C4, MoCo transfer)."""

    num_classes: int
    res5_head: str = "native"
    norm: str = "syncbn"
    train_sizes: tuple[int, int] = (600, 800)  # short side, uniform integer in [lo, hi]
    test_size: int = 800
    max_size: int = 1333
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_iou: tuple[float, float] = (0.3, 0.7)
    rpn_batch_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_topk: tuple[int, int] = (12000, 6000)  # train, test
    rpn_post_nms_topk: tuple[int, int] = (2000, 1000)
    rpn_nms: float = 0.7
    rois_per_image: int = 512
    roi_positive_fraction: float = 0.25
    roi_iou: float = 0.5
    box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    pooler_resolution: int = 14
    score_thresh: float = 0.05
    test_nms: float = 0.5
    detections_per_image: int = 100

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DetectorConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class C4Trunk(nn.Module):
    """Stem + res2..res4 of a timm/torchvision ResNet, names unchanged (conv1, bn1, layer1..layer3)."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        for name in TRUNK_PARTS:
            setattr(self, name, getattr(resnet, name))
        last = resnet.layer3[-1]
        self.out_channels = (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in TRUNK_PARTS:
            x = getattr(self, name)(x)
        return x


class D2Bottleneck(nn.Module):
    """detectron2's res5 bottleneck block (stride in the 3 x 3, STRIDE_IN_1X1 False), torchvision names."""

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = (nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                         nn.BatchNorm2d(out_channels))
                           if stride != 1 or in_channels != out_channels else None)
        for conv in (self.conv1, self.conv2, self.conv3):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # c2_msra_fill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


def d2_bottleneck_res5(in_channels: int, out_channels: int) -> nn.Sequential:
    """detectron2's stock Res5ROIHeads stage: three bottlenecks, width 512, the first with stride 2."""
    blocks = [D2Bottleneck(in_channels if i == 0 else out_channels, D2_BOTTLENECK_WIDTH, out_channels,
                           2 if i == 0 else 1) for i in range(3)]
    return nn.Sequential(*blocks)


class D2AnchorGenerator(AnchorGenerator):
    """detectron2's cell anchors are not rounded to integers (torchvision's are)."""

    def generate_anchors(self, scales: list[int], aspect_ratios: list[float], dtype: torch.dtype = torch.float32,
                         device: torch.device = torch.device("cpu")) -> torch.Tensor:
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        heights = (ratios.sqrt()[:, None] * scales[None, :]).reshape(-1)
        widths = ((1 / ratios.sqrt())[:, None] * scales[None, :]).reshape(-1)
        return torch.stack([-widths, -heights, widths, heights], dim=1) / 2


class D2RPN(RegionProposalNetwork):
    """torchvision's RPN with detectron2's losses: L1 deltas and BCE, both summed / (256 x images)."""

    def compute_loss(self, objectness: torch.Tensor, pred_bbox_deltas: torch.Tensor, labels: list[torch.Tensor],
                     regression_targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        normaliser = self.fg_bg_sampler.batch_size_per_image * len(labels)
        pos = torch.where(torch.cat(sampled_pos))[0]
        sampled = torch.cat([pos, torch.where(torch.cat(sampled_neg))[0]])
        labels_flat = torch.cat(labels)
        targets = torch.cat(regression_targets)
        box_loss = F.l1_loss(pred_bbox_deltas[pos], targets[pos], reduction="sum") / normaliser
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels_flat[sampled],
                                                             reduction="sum") / normaliser
        return objectness_loss, box_loss


def roi_align_v2(feature: torch.Tensor, boxes: list[torch.Tensor], resolution: int) -> torch.Tensor:
    """ROIAlignV2: half-pixel-aligned sampling (torchvision's MultiScaleRoIAlign uses aligned=False)."""
    return roi_align(feature, boxes, output_size=resolution, spatial_scale=1.0 / TRUNK_STRIDE, sampling_ratio=0,
                     aligned=True)


class C4RoIHeads(RoIHeads):
    """Box and mask branches on one res5 pass: res5(pooled RoIs) -> mean -> box predictor; the
    foreground RoIs' res5 output -> mask head. At test the predicted boxes are pooled again for masks."""

    def __init__(self, res5: nn.Module, res5_channels: int, config: DetectorConfig) -> None:
        classes = config.num_classes + 1  # torchvision: background is class 0
        predictor = FastRCNNPredictor(res5_channels, classes)
        nn.init.normal_(predictor.cls_score.weight, std=0.01)
        nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
        for layer in (predictor.cls_score, predictor.bbox_pred):
            nn.init.zeros_(layer.bias)
        super().__init__(box_roi_pool=None, box_head=nn.Identity(), box_predictor=predictor,
                         fg_iou_thresh=config.roi_iou, bg_iou_thresh=config.roi_iou,
                         batch_size_per_image=config.rois_per_image, positive_fraction=config.roi_positive_fraction,
                         bbox_reg_weights=config.box_weights, score_thresh=config.score_thresh,
                         nms_thresh=config.test_nms, detections_per_img=config.detections_per_image)
        self.res5 = res5
        self.mask_head = MaskRCNNPredictor(res5_channels, MASK_HEAD_DIM, classes)
        nn.init.normal_(self.mask_head.mask_fcn_logits.weight, std=0.001)
        nn.init.zeros_(self.mask_head.mask_fcn_logits.bias)
        self.resolution = config.pooler_resolution

    def _res5(self, feature: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        return self.res5(roi_align_v2(feature, boxes, self.resolution))

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]], targets: list[dict[str, torch.Tensor]] | None = None):
        feature = features["0"]
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        res5 = self._res5(feature, proposals)
        class_logits, box_regression = self.box_predictor(res5.mean(dim=(2, 3)))
        if self.training:
            return [], self._losses(res5, class_logits, box_regression, proposals, matched_idxs, labels,
                                    regression_targets, targets)
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        detections = [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]
        if sum(len(b) for b in boxes):
            masks = maskrcnn_inference(self.mask_head(self._res5(feature, boxes)), labels)
        else:
            side = 2 * ((self.resolution + 1) // 2)
            masks = [feature.new_zeros((0, 1, side, side)) for _ in boxes]
        for detection, mask in zip(detections, masks):
            detection["masks"] = mask
        return detections, {}

    def _losses(self, res5: torch.Tensor, class_logits: torch.Tensor, box_regression: torch.Tensor,
                proposals: list[torch.Tensor], matched_idxs: list[torch.Tensor], labels: list[torch.Tensor],
                regression_targets: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        all_labels = torch.cat(labels)
        all_targets = torch.cat(regression_targets)
        loss_cls = F.cross_entropy(class_logits, all_labels)
        positive = torch.where(all_labels > 0)[0]
        deltas = box_regression.reshape(len(all_labels), -1, 4)[positive, all_labels[positive]]
        loss_box = F.l1_loss(deltas, all_targets[positive], reduction="sum") / max(all_labels.numel(), 1)
        foreground = [torch.where(lab > 0)[0] for lab in labels]
        offsets = torch.tensor([0] + [len(p) for p in proposals[:-1]], device=res5.device).cumsum(0)
        flat = torch.cat([fg + offset for fg, offset in zip(foreground, offsets)])
        loss_mask = maskrcnn_loss(self.mask_head(res5[flat]), [p[fg] for p, fg in zip(proposals, foreground)],
                                  [t["masks"] for t in targets], [t["labels"] for t in targets],
                                  [m[fg] for m, fg in zip(matched_idxs, foreground)])
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box, "loss_mask": loss_mask}


class SizedTransform(GeneralizedRCNNTransform):
    """Resize + normalise: train short side uniform in [lo, hi] (one per image), test a fixed size."""

    def __init__(self, train_sizes: tuple[int, int], test_size: int, max_size: int) -> None:
        self.train_sizes = tuple(range(train_sizes[0], train_sizes[1] + 1))
        self.test_size = test_size
        super().__init__(min_size=self.train_sizes, max_size=max_size, image_mean=list(IMAGENET_MEAN),
                         image_std=list(IMAGENET_STD), size_divisible=TRUNK_STRIDE)

    def forward(self, images, targets=None):
        self.min_size = self.train_sizes if self.training else (self.test_size,)
        return super().forward(images, targets)


class C4MaskRCNN(GeneralizedRCNN):
    """The whole detector; `backbone` is the C4 trunk, `roi_heads.res5` the res5 head."""

    def __init__(self, trunk: C4Trunk, res5: nn.Module, res5_channels: int, config: DetectorConfig) -> None:
        anchors = D2AnchorGenerator(sizes=(config.anchor_sizes,), aspect_ratios=(config.aspect_ratios,))
        head = RPNHead(trunk.out_channels, anchors.num_anchors_per_location()[0])
        rpn = D2RPN(anchors, head, fg_iou_thresh=config.rpn_iou[1], bg_iou_thresh=config.rpn_iou[0],
                    batch_size_per_image=config.rpn_batch_per_image, positive_fraction=config.rpn_positive_fraction,
                    pre_nms_top_n={"training": config.rpn_pre_nms_topk[0], "testing": config.rpn_pre_nms_topk[1]},
                    post_nms_top_n={"training": config.rpn_post_nms_topk[0], "testing": config.rpn_post_nms_topk[1]},
                    nms_thresh=config.rpn_nms)
        roi_heads = C4RoIHeads(res5, res5_channels, config)
        transform = SizedTransform(config.train_sizes, config.test_size, config.max_size)
        super().__init__(trunk, rpn, roi_heads, transform)
        self.config = config


@dataclass
class LoadReport:
    """What the detector took from the checkpoint, tensor by tensor."""

    trunk_loaded: int
    trunk_total: int
    res5_loaded: int
    res5_total: int
    res5_skipped: list[str] = field(default_factory=list)  # present in the checkpoint, wrong shape
    res5_random: list[str] = field(default_factory=list)  # no tensor of that name in the checkpoint
    scratch: bool = False  # no checkpoint: every tensor is randomly initialised on purpose

    def describe(self) -> str:
        if self.scratch:
            return (f"random initialisation ('scratch'): trunk {self.trunk_total} and res5 {self.res5_total} "
                    "tensors, none from a checkpoint")
        text = (f"trunk {self.trunk_loaded}/{self.trunk_total} tensors loaded "
                f"({self.trunk_total - self.trunk_loaded} missing); res5 {self.res5_loaded}/{self.res5_total}")
        if self.res5_skipped:
            text += f"; res5 shape mismatches kept random: {', '.join(self.res5_skipped)}"
        if self.res5_random:
            text += f"; res5 tensors absent from the checkpoint: {len(self.res5_random)}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _count_equal(module: nn.Module, source: dict[str, torch.Tensor], prefix: str) -> tuple[int, int]:
    """How many of `module`'s tensors equal the checkpoint tensor `prefix + name` (a real check, not a count)."""
    state = module.state_dict()
    equal = sum(1 for name, tensor in state.items()
                if prefix + name in source and source[prefix + name].shape == tensor.shape
                and torch.equal(source[prefix + name], tensor))
    return equal, len(state)


def _load_like_detectron2(res5: nn.Module, source: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy `layer4.*` tensors into the stock head where name and shape agree, as detectron2's checkpointer does."""
    skipped, absent = [], []
    with torch.no_grad():
        for name, tensor in res5.state_dict().items():
            theirs = source.get(f"layer4.{name}")
            if theirs is None:
                absent.append(name)
            elif theirs.shape != tensor.shape:
                skipped.append(name)
            else:
                tensor.copy_(theirs)
    return skipped, absent


def _freeze_bn(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d -> FrozenBatchNorm2d carrying the same affine parameters and statistics."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, name).copy_(getattr(module, name).detach())
        return frozen
    for name, child in module.named_children():
        setattr(module, name, _freeze_bn(child))
    return module


def build_detector(resnet: nn.Module, config: DetectorConfig,
                   source: dict[str, torch.Tensor] | None = None) -> tuple[C4MaskRCNN, LoadReport]:
    """A C4 Mask R-CNN around `resnet` (a timm ResNet, already holding the checkpoint's weights when `source`
    is given); the report proves which tensors came from `source` (None = scratch)."""
    if config.res5_head not in RES5_HEADS:
        raise MokdError(f"--res5-head {config.res5_head!r}: use one of {', '.join(RES5_HEADS)}")
    if config.norm not in NORMS:
        raise MokdError(f"--norm {config.norm!r}: use one of {', '.join(NORMS)}")
    resnet = copy.deepcopy(resnet).train()
    trunk = C4Trunk(resnet)
    source = source or {}
    trunk_loaded, trunk_total = _count_equal(trunk, source, "")
    if config.res5_head == "native":
        res5 = resnet.layer4
        last = res5[-1]
        channels = (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels
        res5_loaded, res5_total = _count_equal(res5, source, "layer4.")
        skipped, absent = [], [n for n in res5.state_dict() if f"layer4.{n}" not in source]
    else:
        channels = 2048 if trunk.out_channels >= 1024 else 512
        res5 = d2_bottleneck_res5(trunk.out_channels, channels)
        skipped, absent = _load_like_detectron2(res5, source) if source else ([], list(res5.state_dict()))
        res5_loaded, res5_total = _count_equal(res5, source, "layer4.")
    if config.norm == "syncbn":
        res5 = nn.Sequential(OrderedDict([("blocks", res5), ("norm", nn.BatchNorm2d(channels))]))  # extra norm
    else:
        trunk, res5 = _freeze_bn(trunk), _freeze_bn(res5)
        for part in FROZEN_AT_2:
            for parameter in getattr(trunk, part).parameters():
                parameter.requires_grad_(False)
    report = LoadReport(trunk_loaded, trunk_total, res5_loaded, res5_total, skipped, absent if source else [],
                        scratch=not source)
    return C4MaskRCNN(trunk, res5, channels, config), report
