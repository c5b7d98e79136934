"""`shapes-coco`: a seeded COCO-format instance-segmentation dataset drawn on the fly.

Why: the detection transfer (`mokd-eval coco`) must run and be tested anywhere, without COCO's 20 GB.
Each image is a textured background (a colour gradient, stripes and noise) with one to three
non-overlapping filled polygons (circle, square, triangle) whose segmentation is stored as a COCO
polygon; the pixels painted are exactly the polygon's pycocotools rasterisation, so a prediction equal
to the annotation scores 100 AP. Category ids are deliberately not contiguous (10, 20, 30) so the
mapping from the detector's labels back to COCO ids is exercised. `write_shapes_coco` writes the same
data in COCO's on-disk layout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from mokd.core import atomic

SHAPES_COCO_VERSION = 1
SHAPES_COCO_SEED = 20230602
DEFAULT_IMAGES = 100
DEFAULT_IMAGE_SIZE = 128
MIN_IMAGE_SIZE = 32
VAL_DIVISOR = 4  # shapes-coco:N has N train images and N // 4 (at least 2) val images
CATEGORIES = ({"id": 10, "name": "circle"}, {"id": 20, "name": "square"}, {"id": 30, "name": "triangle"})
MAX_OBJECTS = 3
CIRCLE_VERTICES = 32
_NOISE = 12
_PLACEMENT_TRIES = 20


def num_val_images(num_train: int) -> int:
    return max(2, num_train // VAL_DIVISOR)


def _polygon(rng: np.random.Generator, name: str, size: int) -> list[float]:
    """A polygon of class `name` that lies inside the image, as a flat COCO [x0, y0, x1, y1, ...] list."""
    radius = rng.uniform(0.1, 0.25) * size
    cx, cy = rng.uniform(radius + 1, size - radius - 1, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    if name == "circle":
        corners = [2 * math.pi * k / CIRCLE_VERTICES for k in range(CIRCLE_VERTICES)]
    elif name == "square":
        corners = [angle + math.pi / 2 * k for k in range(4)]
    else:
        corners = [angle + 2 * math.pi / 3 * k for k in range(3)]
    points = []
    for theta in corners:
        points += [round(cx + radius * math.cos(theta), 2), round(cy + radius * math.sin(theta), 2)]
    return points


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A colour gradient with faint stripes: texture the detector must learn to ignore."""
    start, end = rng.integers(0, 256, size=(2, 3))
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    image = start + (end - start) * ramp  # size x 1 x 3
    image = np.broadcast_to(image, (size, size, 3)).copy()
    if rng.integers(0, 2):
        image = image.transpose(1, 0, 2).copy()
    period = rng.uniform(4, 12)
    stripes = (np.floor(np.arange(size) / period) % 2)[None, :, None] * rng.uniform(10, 30)
    return image + stripes


def _image(rng: np.random.Generator, size: int, categories: tuple[dict[str, Any], ...],
           max_objects: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Pixels and the (segmentation, category id, rasterised mask) of every object in one image."""
    image = _background(rng, size)
    occupied = np.zeros((size, size), dtype=bool)
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        category = categories[int(rng.integers(0, len(categories)))]
        for _ in range(_PLACEMENT_TRIES):
            polygon = _polygon(rng, category["name"], size)
            rle = mask_utils.merge(mask_utils.frPyObjects([polygon], size, size))
            mask = mask_utils.decode(rle).astype(bool)
            if mask.any() and not (mask & occupied).any():
                break
        else:
            continue
        occupied |= mask
        colour = rng.integers(0, 256, size=3)
        image[mask] = colour
        objects.append({"segmentation": [polygon], "category_id": category["id"], "rle": rle})
    noise = rng.integers(-_NOISE, _NOISE + 1, size=image.shape)
    return np.clip(np.rint(image) + noise, 0, 255).astype(np.uint8), objects


def generate_shapes_coco(num_images: int, image_size: int = DEFAULT_IMAGE_SIZE, *, split: str = "train",
                         seed: int = SHAPES_COCO_SEED, num_categories: int = len(CATEGORIES),
                         max_objects: int = MAX_OBJECTS) -> tuple[dict[str, Any], list[np.ndarray]]:
    """A COCO instances dict and the matching list of H x W x 3 uint8 images (index i = image id i + 1).

    The split enters the seed, so train and val never share an image. Fewer categories or objects per
    image give an easier set (the training test uses one).
    """
    categories = CATEGORIES[:num_categories]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, num_images, image_size, num_categories,
                                 max_objects])
    images, annotations, pixels = [], [], []
    for index in range(num_images):
        image_id = index + 1
        array, objects = _image(rng, image_size, categories, max_objects)
        pixels.append(array)
        images.append({"id": image_id, "file_name": f"{image_id:06d}.png", "height": image_size,
                       "width": image_size})
        for obj in objects:
            x, y, w, h = (float(v) for v in mask_utils.toBbox(obj["rle"]))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": obj["category_id"],
                                "segmentation": obj["segmentation"], "area": float(mask_utils.area(obj["rle"])),
                                "bbox": [x, y, w, h], "iscrowd": 0})
    info = {"description": f"mokd shapes-coco v{SHAPES_COCO_VERSION}", "seed": seed, "split": split}
    dataset = {"info": info, "images": images, "annotations": annotations, "categories": [dict(c) for c in categories]}
    return dataset, pixels


def write_shapes_coco(root: str | Path, num_train: int = DEFAULT_IMAGES, image_size: int = DEFAULT_IMAGE_SIZE,
                      *, seed: int = SHAPES_COCO_SEED) -> Path:
    """Write shapes-coco in COCO's layout: annotations/instances_{train,val}2017.json, {train,val}2017/*.png."""
    root = Path(root)
    for split, count in (("train", num_train), ("val", num_val_images(num_train))):
        dataset, pixels = generate_shapes_coco(count, image_size, split=split, seed=seed)
        folder = root / f"{split}2017"
        folder.mkdir(parents=True, exist_ok=True)
        for entry, array in zip(dataset["images"], pixels):
            Image.fromarray(array).save(folder / entry["file_name"])
        atomic.write_text(root / "annotations" / f"instances_{split}2017.json", json.dumps(dataset))
    return root
