"""COCO instance data for the detection transfer: `--data ROOT` (COCO layout) or `shapes-coco[:N]`.

One place reads COCO: annotations go through pycocotools, crowd annotations are dropped, training
skips images without a non-crowd box (detectron2's filter), evaluation keeps every val image. Labels
are contiguous 1..K in the sorted order of the COCO category ids (0 is torchvision's background).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from mokd.core.data import UNREADABLE_IMAGE_ERRORS, read_image, unreadable_reason
from mokd_eval.detection import shapes_coco
from mokd.core.errors import MokdError

SHAPES_KIND = "shapes-coco"
COCO_KEYS = ("images", "annotations", "categories")


@dataclass
class CocoSplit:
    """One split: the pycocotools index and a way to read image `id` as H x W x 3 uint8."""

    coco: COCO
    read_image: Callable[[int], np.ndarray]
    fingerprint: str

    @property
    def category_ids(self) -> list[int]:
        return sorted(self.coco.getCatIds())


@dataclass
class CocoData:
    """The parsed `--data`: canonical text, train and val splits, and (shapes-coco) the native image size."""

    text: str
    train: CocoSplit
    val: CocoSplit
    native_size: int | None

    @property
    def category_ids(self) -> list[int]:
        return self.train.category_ids

    def record(self) -> dict[str, Any]:
        return {"spec": self.text, "train_images": len(self.train.coco.getImgIds()),
                "val_images": len(self.val.coco.getImgIds()), "num_classes": len(self.category_ids),
                "category_ids": self.category_ids,
                "fingerprint": {"train": self.train.fingerprint, "val": self.val.fingerprint}}


def index_coco(dataset: dict[str, Any]) -> COCO:
    """A pycocotools index of an in-memory COCO dict, without its progress prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _shapes(raw: str, arg: str | None) -> CocoData:
    """`shapes-coco[:N[:SIZE]]`: N train images (N // 4 val) of SIZE x SIZE pixels."""
    count_text, _, size_text = (arg or "").partition(":")
    try:
        count = int(count_text) if count_text else shapes_coco.DEFAULT_IMAGES
        size = int(size_text) if size_text else shapes_coco.DEFAULT_IMAGE_SIZE
    except ValueError:
        raise MokdError(f"--data {raw!r}: use {SHAPES_KIND}[:N[:SIZE]] with whole numbers, e.g. "
                        f"{SHAPES_KIND}:200:128") from None
    if count < 1 or size < shapes_coco.MIN_IMAGE_SIZE:
        raise MokdError(f"--data {raw!r}: shapes-coco needs at least 1 image of at least "
                        f"{shapes_coco.MIN_IMAGE_SIZE} px")
    text = f"{SHAPES_KIND}:{count}:{size}"
    splits = []
    for split, n in (("train", count), ("val", shapes_coco.num_val_images(count))):
        dataset, pixels = shapes_coco.generate_shapes_coco(n, size, split=split)
        fingerprint = _hash(f"{text} v{shapes_coco.SHAPES_COCO_VERSION} {split}")
        splits.append(CocoSplit(index_coco(dataset), lambda image_id, p=pixels: p[image_id - 1], fingerprint))
    return CocoData(text, splits[0], splits[1], native_size=size)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as handle:
            dataset = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MokdError(f"{path} cannot be read as JSON ({type(error).__name__}): re-download or re-extract "
                        "the COCO annotations") from None
    missing = [key for key in COCO_KEYS if not isinstance(dataset, dict) or not isinstance(dataset.get(key), list)]
    if missing:
        raise MokdError(f"{path} is not a COCO instances file (no {', '.join(missing)} list): "
                        "pass the instances_<split>2017.json of a COCO-layout dataset")
    if not dataset["categories"]:
        raise MokdError(f"{path} has no categories: it is not a COCO instances file")
    categories = {category.get("id") for category in dataset["categories"] if isinstance(category, dict)}
    for annotation in dataset["annotations"]:
        problem = annotation_problem(annotation, categories)
        if problem:
            name = annotation.get("id", "?") if isinstance(annotation, dict) else "?"
            raise MokdError(f"{path}: annotation id {name} {problem}; fix or remove that annotation")
    return dataset


def annotation_problem(annotation: Any, categories: set[Any]) -> str | None:
    """What makes one instance annotation unusable for Mask R-CNN training, or None: checked when the file is
    read, so a bad entry never surfaces as a KeyError or a pycocotools TypeError mid-training."""
    if not isinstance(annotation, dict):
        return "is not an object"
    box = annotation.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(_is_finite_number(value) for value in box)):
        return f"has bbox {box!r}: it needs 4 finite numbers [x, y, width, height]"
    if annotation.get("category_id") not in categories:
        return f"has category_id {annotation.get('category_id')!r}, which is not in 'categories'"
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, dict):  # RLE
        return None if {"counts", "size"} <= set(segmentation) else "has an RLE segmentation without counts/size"
    if not isinstance(segmentation, list) or not segmentation:
        return "has no segmentation (a list of polygons or an RLE object)"
    for polygon in segmentation:
        if not (isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0
                and all(_is_finite_number(value) for value in polygon)):
            return "has a polygon that is not at least 3 finite (x, y) points (6 or more numbers, an even count)"
    return None


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _folder_split(root: Path, split: str) -> CocoSplit:
    annotations = root / "annotations" / f"instances_{split}2017.json"
    images = root / f"{split}2017"
    layout = f"expected {root}/annotations/instances_{{train,val}}2017.json and {root}/{{train,val}}2017/"
    if not annotations.is_file():
        raise MokdError(f"COCO data: {annotations} does not exist; {layout}")
    if not images.is_dir():
        raise MokdError(f"COCO data: image folder {images} does not exist; {layout}")
    dataset = _read_json(annotations)
    coco = index_coco(dataset)

    def read(image_id: int) -> np.ndarray:
        path = images / coco.imgs[image_id]["file_name"]
        try:
            return np.asarray(read_image(str(path)))
        except UNREADABLE_IMAGE_ERRORS as error:
            raise MokdError(f"cannot read image {path} ({unreadable_reason(error)}): fix or remove it") from None

    stat = annotations.stat()
    return CocoSplit(coco, read, _hash(f"{annotations} {stat.st_size} {stat.st_mtime_ns}"))


def open_coco(data: str) -> CocoData:
    """Parse `--data` (a COCO root or `shapes-coco[:N]`) and index both splits."""
    raw = data.strip()
    kind, sep, arg = raw.partition(":")
    if kind.lower() == SHAPES_KIND:
        return _shapes(raw, arg if sep else None)
    root = Path(os.path.expanduser(raw)).resolve()
    if not root.is_dir():
        raise MokdError(f"--data {raw!r}: no such directory; give a COCO root (annotations/, train2017/, val2017/) "
                        f"or {SHAPES_KIND}[:N[:SIZE]]")
    train, val = _folder_split(root, "train"), _folder_split(root, "val")
    if sorted(train.coco.getCatIds()) != sorted(val.coco.getCatIds()):
        raise MokdError(f"COCO data {root}: train and val annotations have different categories")
    return CocoData(str(root), train, val, native_size=None)


class DetectionDataset(Dataset):
    """Items are `(image float 0..1 3 x H x W, target)` with xyxy `boxes`, `labels` 1..K, uint8 `masks`.

    `train=True` keeps only images with a non-crowd box and flips horizontally with probability 0.5.
    """

    def __init__(self, split: CocoSplit, category_ids: list[int], *, train: bool) -> None:
        self.split = split
        self.label_of = {cat: index + 1 for index, cat in enumerate(category_ids)}
        self.train = train
        ids = sorted(split.coco.getImgIds())
        self.ids = [i for i in ids if self._annotations(i)] if train else ids

    def _annotations(self, image_id: int) -> list[dict[str, Any]]:
        anns = self.split.coco.imgToAnns.get(image_id, [])
        return [a for a in anns if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.ids[index]
        pixels = self.split.read_image(image_id)
        anns = self._annotations(image_id)
        height, width = pixels.shape[:2]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        masks = (torch.from_numpy(np.stack([self.split.coco.annToMask(a) for a in anns]))
                 if anns else torch.zeros((0, height, width), dtype=torch.uint8))
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        image = torch.as_tensor(np.array(pixels, copy=True)).permute(2, 0, 1).float().div_(255)  # PIL arrays are read-only
        if self.train and torch.rand(()) < 0.5:
            image, masks = image.flip(-1), masks.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        return image, {"boxes": boxes, "labels": labels, "masks": masks, "image_id": torch.tensor(image_id)}


def collate(batch: list[Any]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Detection batches are lists: images differ in size."""
    images, targets = zip(*batch)
    return list(images), list(targets)
