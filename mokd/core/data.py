"""Dataset spec strings (`--data SPEC`) -> labelled datasets and their evaluation transforms.

One spec string names the data everywhere (feature extraction, k-NN, linear probe, training) and is
printed with every result, together with a fingerprint that changes when the data on disk changes, so
two numbers are only compared when they were computed on the same images.

Forms: `imagefolder:PATH` (PATH/train and PATH/val class folders), `cifar10:PATH`, `cifar100:PATH`
(torchvision's python-pickle layout, never downloaded), `digits` (scikit-learn's 1,797 real 8x8
scans, upsampled to 32 px) and `shapes[:N]` (procedurally drawn shapes and textures). The last two
need no files, so tests and CPU demos run anywhere.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.transforms import functional as TF
from torchvision.datasets.folder import find_classes

from mokd.core.errors import MokdError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATA_ENV_VAR = "MOKD_DATA"
DEFAULT_DATA = "digits"
SPEC_FORMS = "imagefolder:PATH, cifar10:PATH, cifar100:PATH, digits, shapes or shapes:N"
SPLITS = ("train", "val")

# Bump when the digits upsampling or the shapes drawing changes: it is part of their fingerprint.
GENERATOR_VERSION = 1
SMALL_IMAGE_SIZE = 32
VAL_FRACTION = 0.2
SPLIT_SEED = 0
SHAPES_SEED = 20230601
DEFAULT_SHAPES_SIZE = 1000
SHAPES_CLASSES = (
    "circle", "square", "triangle", "cross", "ring",
    "horizontal_stripes", "vertical_stripes", "checkerboard", "diagonal_stripes", "dots",
)
_SHAPES_NOISE = 24  # +- grey levels of uniform noise on every shapes pixel
_GRID_Y, _GRID_X = np.mgrid[0:SMALL_IMAGE_SIZE, 0:SMALL_IMAGE_SIZE] + 0.5  # pixel centres
# Stratified 80/20 needs at least one image per class in val: 10 classes / 0.2.
MIN_SHAPES_SIZE = int(len(SHAPES_CLASSES) / VAL_FRACTION)
_KINDS_WITH_PATH = ("imagefolder", "cifar10", "cifar100")
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CIFAR_CLASSES = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}


@dataclass(frozen=True)
class DataSpec:
    """A parsed `--data` value; `text` is its canonical form (absolute paths, explicit shapes size)."""

    kind: str
    path: Path | None
    size: int | None
    text: str

    @property
    def native_size(self) -> int | None:
        """Side of the stored images when they all share one (small datasets), else None."""
        return None if self.kind == "imagefolder" else SMALL_IMAGE_SIZE


def parse_data_spec(text: str | None) -> DataSpec:
    """Parse a spec string; None means `$MOKD_DATA`, or `digits` when that is unset or empty."""
    raw = text if text is not None else (os.environ.get(DATA_ENV_VAR) or DEFAULT_DATA)
    kind, sep, arg = raw.strip().partition(":")
    kind = kind.lower()

    source = "--data" if text is not None else f"${DATA_ENV_VAR} (used when --data is not given)"

    def bad(reason: str) -> MokdError:
        return MokdError(f"{source} {raw!r}: {reason}; use one of: {SPEC_FORMS}")

    if kind in _KINDS_WITH_PATH:
        if not arg.strip():
            raise bad(f"'{kind}' needs a path after the colon")
        path = Path(arg.strip()).expanduser().resolve()
        return DataSpec(kind, path, None, f"{kind}:{path}")
    if kind == "digits":
        if sep:
            raise bad("'digits' takes no argument")
        return DataSpec("digits", None, None, "digits")
    if kind == "shapes":
        size = DEFAULT_SHAPES_SIZE
        if sep:
            try:
                size = int(arg)
            except ValueError:
                raise bad("the shapes size must be an integer") from None
        if size < MIN_SHAPES_SIZE:
            raise bad(f"shapes needs at least {MIN_SHAPES_SIZE} images for a stratified 80/20 split")
        return DataSpec("shapes", None, size, f"shapes:{size}")
    raise bad(f"unknown dataset kind {kind!r}")


class LabelledDataset(Dataset):
    """Items are `(transform(PIL RGB image), int label)`, from in-memory pixels or image files.

    `num_classes` comes from the dataset definition (train classes), never from the labels that
    happen to be present in this split. With `skip_bad_images`, an unreadable file yields None
    instead of raising; the feature extractor drops those and counts them.
    """

    def __init__(
        self,
        spec: DataSpec,
        split: str,
        classes: list[str],
        targets: np.ndarray,
        fingerprint: str,
        *,
        pixels: np.ndarray | None = None,
        folder: datasets.ImageFolder | None = None,
        transform: Callable | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        if (pixels is None) == (folder is None):
            raise ValueError("give exactly one of pixels (N x H x W x 3 uint8) or folder")
        self.spec = spec
        self.split = split
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.fingerprint = fingerprint
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self._pixels = pixels
        self._folder = folder

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def decodes_files(self) -> bool:
        """Whether each item is read and decoded from an image file (milliseconds of CPU per image) rather than
        taken from memory (microseconds): the feature extractor sizes its loading by it."""
        return self._folder is not None

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        image = self._load(index)
        if image is None:
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def item_name(self, index: int) -> str:
        """The name a split file (SimCLR's 1%/10% lists) uses for an item: the image file name for folders,
        `<split>_<index>` (6 digits) for in-memory datasets."""
        if self._folder is not None:
            return os.path.basename(self._folder.samples[index][0])
        return f"{self.split}_{index:06d}"

    def with_transform(self, transform: Callable | None) -> "LabelledDataset":
        """The same items under another transform (training augmentation vs evaluation)."""
        clone = copy.copy(self)
        clone.transform = transform
        return clone

    def _load(self, index: int) -> Image.Image | None:
        if self._pixels is not None:
            return Image.fromarray(self._pixels[index])
        path, _ = self._folder.samples[index]
        try:
            return read_image(path)
        except UNREADABLE_IMAGE_ERRORS as error:
            if self.skip_bad_images:
                return None
            raise MokdError(f"cannot read image {path} ({unreadable_reason(error)}); fix or remove it, "
                            "or pass --skip-bad-images") from None


class UnsupportedImage(ValueError):
    """An image file that decodes, but into pixels whose range mokd cannot map to 8 bits without guessing."""


# PIL reports broken files as OSError or SyntaxError, and oversized ones as DecompressionBombError.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError, UnsupportedImage)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def read_image(path: str) -> Image.Image:
    """The one image reader: an 8-bit RGB image. 16-bit greyscale is scaled to 8 bits (PIL's convert would clip
    every value above 255 to white); 32-bit integer and float pixels are refused, their range being unknown."""
    with open(path, "rb") as handle:
        image = Image.open(handle)
        image.load()
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.rint(np.asarray(image, dtype=np.float64) / 257.0).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ("I", "F"):
        raise UnsupportedImage(f"{'32-bit integer' if image.mode == 'I' else 'floating-point'} pixels (PIL mode "
                               f"{image.mode}) have no known range; save it with 8 or 16 bits per channel")
    return image if image.mode == "RGB" else image.convert("RGB")


def unreadable_reason(error: BaseException) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not an image file PIL can decode"
    if isinstance(error, Image.DecompressionBombError):
        return (f"more pixels than PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS}; "
                "if the image is genuine, shrink it")
    return getattr(error, "strerror", None) or str(error)


def open_dataset(
    spec: DataSpec,
    split: str,
    transform: Callable | None = None,
    *,
    skip_bad_images: bool = False,
) -> LabelledDataset:
    """Open one split ("train" or "val") of the dataset `spec` names."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if spec.kind == "imagefolder":
        return _open_imagefolder(spec, split, transform, skip_bad_images)
    if spec.kind in _CIFAR_CLASSES:
        return _open_cifar(spec, split, transform)
    if spec.kind in ("digits", "shapes"):
        pixels, targets = _generated_split(spec.kind, spec.size, split)
        classes = [str(digit) for digit in range(10)] if spec.kind == "digits" else list(SHAPES_CLASSES)
        fingerprint = _hash_lines([spec.text, f"generator={GENERATOR_VERSION}", split])
        return LabelledDataset(spec, split, classes, targets, fingerprint, pixels=pixels, transform=transform)
    raise ValueError(f"unknown dataset kind {spec.kind!r}")


def eval_transform(spec: DataSpec, image_size: int | None = None) -> tuple["NormalizedImage", str]:
    """The evaluation transform for `spec` and an exact description of it (a cache key, printed with results).

    ImageNet-style folders follow DINO's k-NN/linear protocol: bicubic resize of the short side to
    256 then a 224 centre crop (both scaled by S/224 for `image_size` S). Small 32 px datasets are
    used at native size; a different `image_size` resizes them bicubically to S x S.
    """
    norm_text = f"Normalize(mean={IMAGENET_MEAN}, std={IMAGENET_STD})"
    bicubic = T.InterpolationMode.BICUBIC
    if spec.native_size is None:
        crop = image_size or 224
        resize = round(crop * 256 / 224)
        steps = [ResizeCenterCrop(resize, crop)]
        text = f"Resize({resize}, bicubic) > CenterCrop({crop})"
    elif image_size is None or image_size == spec.native_size:
        steps = []
        text = f"native {spec.native_size}px"
    else:
        steps = [T.Resize((image_size, image_size), interpolation=bicubic)]
        text = f"Resize({image_size}x{image_size}, bicubic)"
    return NormalizedImage(steps), f"{text} > ToTensor > {norm_text}"


class ResizeCenterCrop:
    """torchvision's `Resize(resize, bicubic) > CenterCrop(crop)` (DINO's evaluation resize) as one PIL resize of
    the source box that becomes the crop.

    Why: it resamples only the pixels that are kept, which cuts the CPU time of the step by ~40 % for
    ImageNet-sized JPEGs (1.3 vs 2.2 ms at 500x375 -> 224) and leaves those cores to the forward pass. The output
    size, crop offsets, sampling positions and bicubic filter are torchvision's, and PIL clips the filter at the
    image's edges, not the box's, so only the float rounding of the filter weights differs: at most one grey level,
    on ~1e-4 of the values when downscaling, up to ~6e-3 when upscaling small images (tests/core/test_data.py).
    """

    def __init__(self, resize: int, crop: int) -> None:
        if crop > resize:
            raise ValueError(f"the crop ({crop}) must not exceed the resized short side ({resize})")
        self.resize, self.crop = resize, crop

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        resized_width, resized_height = _short_side_resized(width, height, self.resize)
        left = int(round((resized_width - self.crop) / 2.0))  # torchvision's CenterCrop offsets
        top = int(round((resized_height - self.crop) / 2.0))
        if (resized_width, resized_height) == (width, height):  # torchvision skips the resize too
            return image.crop((left, top, left + self.crop, top + self.crop))
        scale_x, scale_y = width / resized_width, height / resized_height
        box = (left * scale_x, top * scale_y, (left + self.crop) * scale_x, (top + self.crop) * scale_y)
        return image.resize((self.crop, self.crop), Image.Resampling.BICUBIC, box=box)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resize={self.resize}, crop={self.crop}, bicubic)"


def _short_side_resized(width: int, height: int, short: int) -> tuple[int, int]:
    """torchvision's `Resize(int)` output size: the short side becomes `short`, the long side keeps the aspect
    ratio, truncated."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


class NormalizedImage:
    """PIL steps, then ToTensor and Normalize with ImageNet's statistics: `T.Compose([*steps, ToTensor,
    Normalize])`, with the two halves also usable apart.

    A batch consumer (the feature extractor) ships `pixels` (8-bit, a quarter of the bytes) from its loader
    workers and normalises whole batches on its device (`batch_normalizer`): the same arithmetic, `(x / 255 - mean) /
    std` element by element, so the same floats bit for bit.
    """

    def __init__(self, steps: list[Callable]) -> None:
        self.steps = T.Compose(steps)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return TF.normalize(TF.to_tensor(self.steps(image)), IMAGENET_MEAN, IMAGENET_STD)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The image after the PIL steps as an 8-bit H x W x C tensor (C = 3 for every image `read_image` returns)."""
        array = np.array(self.steps(image), dtype=np.uint8)
        return torch.from_numpy(array if array.ndim == 3 else array[:, :, None])

    @staticmethod
    def batch_normalizer(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """N x H x W x C 8-bit pixels on `device` -> what `__call__` gives each image, stacked: N x C x H x W
        float32, laid out channels_last (the memory order of the pixels, and the one CNNs run fastest in).
        The constants are placed on `device` once, not per batch."""
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(-1, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(-1, 1, 1)

        def normalize(pixels: torch.Tensor) -> torch.Tensor:
            return pixels.permute(0, 3, 1, 2).to(torch.float32).div_(255).sub_(mean).div_(std)

        return normalize


def image_side(spec: DataSpec, image_size: int | None = None) -> int:
    """The side of the images a protocol sees: `image_size`, else native for small datasets, else 224."""
    return image_size or spec.native_size or 224


def train_transform(spec: DataSpec, image_size: int | None = None, *, crop: str = "resized") -> tuple[Callable, str]:
    """The training augmentation of the supervised protocols, and its description.

    `resized` (linear probe, semi-supervised fine-tuning): RandomResizedCrop (scale 0.08-1, bicubic) to the
    evaluation crop size + horizontal flip. `padded` (CIFAR fine-tuning): resize to the size, random crop with
    1/8 reflect padding + flip. Sizes follow `eval_transform`: 224 for folders, native 32 px for small datasets,
    `image_size` when given.
    """
    size = image_side(spec, image_size)
    bicubic = T.InterpolationMode.BICUBIC
    if crop == "resized":
        steps = [T.RandomResizedCrop(size, interpolation=bicubic)]
        text = f"RandomResizedCrop({size}, scale=(0.08, 1.0), bicubic)"
    elif crop == "padded":
        steps = [T.Resize((size, size), interpolation=bicubic), T.RandomCrop(size, padding=size // 8,
                                                                             padding_mode="reflect")]
        text = f"Resize({size}x{size}, bicubic) > RandomCrop({size}, padding={size // 8}, reflect)"
    else:
        raise ValueError(f"crop must be 'resized' or 'padded', not {crop!r}")
    transform = T.Compose([*steps, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return transform, f"{text} > RandomHorizontalFlip > ToTensor > Normalize(mean={IMAGENET_MEAN}, std={IMAGENET_STD})"


# --- image folders ---------------------------------------------------------------------------


class _FolderWithClasses(datasets.ImageFolder):
    """ImageFolder whose classes are given (the train split's), so val keeps train's label indices
    even when a class has no val images."""

    def __init__(self, root: Path, classes: list[str]) -> None:
        self._given_classes = classes
        self.bad_entries: list[tuple[str, str]] = []
        super().__init__(str(root), loader=read_image, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._given_classes, {name: index for index, name in enumerate(self._given_classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], *args: Any,
                     **kwargs: Any) -> list[tuple[str, int]]:
        """Every image under each class folder; broken entries are kept as samples (they fail, or are skipped
        and counted, when read) and listed in `bad_entries`."""
        samples = []
        roots = {name: Path(directory) / name for name in class_to_idx}
        # Shared by the classes: a directory is read once in the whole split, and a link back to the split or
        # to a class folder is not a way into another class.
        seen = {_identity(path) for path in [Path(directory), *roots.values()] if path.is_dir()}
        for name, index in class_to_idx.items():
            files, bad = scan_images(roots[name], seen)
            samples += [(path, index) for path in files]
            self.bad_entries += bad
        return samples


def _identity(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_dev, info.st_ino


def scan_images(root: Path, seen: set[tuple[int, int]]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files under `root` in sorted order, following directory links but never into a directory already
    in `seen` (a link loop would otherwise count the same images many times). Returns the files, broken entries
    among them (a dangling or looping link, an unlistable directory) included, and those entries with reasons."""
    per_directory: list[tuple[str, list[str]]] = []
    bad: list[tuple[str, str]] = []
    stack = [root] if root.is_dir() else []
    while stack:
        directory = stack.pop()
        try:
            if directory != root:
                if _identity(directory) in seen:
                    continue
                seen.add(_identity(directory))
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            bad.append((str(directory), f"cannot list this folder: {error.strerror or error}"))
            continue
        files = []
        for entry in entries:
            try:
                if entry.is_dir():
                    stack.append(Path(entry.path))
                    continue
                entry.stat()  # a dangling or looping link fails here
                if datasets.folder.has_file_allowed_extension(entry.name, datasets.folder.IMG_EXTENSIONS):
                    files.append(entry.path)
            except OSError as error:
                bad.append((entry.path, f"a broken link: {error.strerror or error}"))
                files.append(entry.path)
        per_directory.append((str(directory), files))
    return [path for _, files in sorted(per_directory) for path in files], bad


def _open_imagefolder(
    spec: DataSpec, split: str, transform: Callable | None, skip_bad_images: bool
) -> LabelledDataset:
    root = spec.path
    layout = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image>"
    if not root.is_dir():
        raise MokdError(f"image folder {root} does not exist; {layout}")
    for needed in SPLITS:
        if not (root / needed).is_dir():
            raise MokdError(f"image folder {root} has no '{needed}' folder; {layout}")
    try:
        classes, _ = find_classes(root / "train")
    except FileNotFoundError:
        raise MokdError(f"{root / 'train'} has no class folders; {layout}") from None
    split_dir = root / split
    unknown = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and entry.name not in classes)
    if unknown:
        raise MokdError(f"{split_dir} has class folders missing from {root / 'train'}: {', '.join(unknown)}")
    folder = _FolderWithClasses(split_dir, classes)
    if folder.bad_entries and not skip_bad_images:
        path, reason = folder.bad_entries[0]
        more = f" (and {len(folder.bad_entries) - 1} more)" if len(folder.bad_entries) > 1 else ""
        raise MokdError(f"cannot read {path} ({reason}){more}, found while scanning {split_dir}; fix or remove it, "
                        "or pass --skip-bad-images to skip and count it")
    if not folder.samples:
        raise MokdError(f"{split_dir} contains no images (extensions {', '.join(datasets.folder.IMG_EXTENSIONS)})")
    if split == "train":
        empty = sorted(set(classes) - {classes[target] for _, target in folder.samples})
        if empty:
            raise MokdError(f"train class folders without images in {split_dir}: {', '.join(empty)}")
    targets = np.array(folder.targets, dtype=np.int64)
    fingerprint = _folder_fingerprint(split_dir, [path for path, _ in folder.samples], classes, split)
    return LabelledDataset(
        spec, split, classes, targets, fingerprint,
        folder=folder, transform=transform, skip_bad_images=skip_bad_images,
    )


def _folder_fingerprint(split_dir: Path, paths: list[str], classes: list[str], split: str) -> str:
    """Hash of the split, classes and each file's relative path, size and mtime: file bytes are never read."""
    lines = [f"imagefolder split={split}", "classes=" + "/".join(classes)]
    for path in sorted(paths):
        stat = _stat_or_link(path)
        lines.append(f"{os.path.relpath(path, split_dir)}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return _hash_lines(lines)


def _stat_or_link(path: str) -> os.stat_result:
    """The file's own stat; for a broken link (skipped when read), the link's."""
    try:
        return os.stat(path)
    except OSError:
        return os.lstat(path)


# --- CIFAR -------------------------------------------------------------------------------------


def _open_cifar(spec: DataSpec, split: str, transform: Callable | None) -> LabelledDataset:
    folder_name = _CIFAR_FOLDERS[spec.kind]
    cifar_dir = spec.path / folder_name
    if not cifar_dir.is_dir():
        raise MokdError(
            f"{spec.kind}: no {folder_name} folder in {spec.path}; extract the python version of "
            f"{spec.kind} there so that {cifar_dir} exists (mokd never downloads data)"
        )
    dataset_class = _CIFAR_CLASSES[spec.kind]
    try:
        cifar = dataset_class(str(spec.path), train=split == "train", download=False)
    except RuntimeError as error:
        raise MokdError(
            f"{spec.kind} files in {cifar_dir} are incomplete or fail torchvision's MD5 check ({error}); "
            f"re-extract the python version of {spec.kind} there"
        ) from None
    file_names = [name for name, _ in (cifar.train_list if split == "train" else cifar.test_list)]
    lines = [f"{spec.kind} split={split}"]
    for name in [*file_names, cifar.meta["filename"]]:
        stat = os.stat(cifar_dir / name)
        lines.append(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return LabelledDataset(
        spec, split, list(cifar.classes), np.asarray(cifar.targets), _hash_lines(lines),
        pixels=cifar.data, transform=transform,
    )


# --- generated datasets: digits and shapes -----------------------------------------------------


@functools.lru_cache(maxsize=8)
def _generated_split(kind: str, size: int | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N x 32 x 32 x 3 uint8, read-only) and labels of one split, cached per process."""
    pixels, labels = load_digits_32() if kind == "digits" else generate_shapes(size)
    train_index, val_index = _stratified_split(labels)
    index = train_index if split == "train" else val_index
    split_pixels = pixels[index]
    split_pixels.setflags(write=False)
    return split_pixels, labels[index]


def _stratified_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed seeded stratified 80/20 split; each part keeps the original order."""
    train_index, val_index = train_test_split(
        np.arange(len(labels)), test_size=VAL_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return np.sort(train_index), np.sort(val_index)


@functools.lru_cache(maxsize=1)
def load_digits_32() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digit scans as 32 x 32 grey RGB uint8 images, and their labels.

    The 8 x 8 scans (values 0..16) are scaled to 0..255 (rounded), upsampled with PIL's bilinear
    filter, and copied into three channels.
    """
    digits = load_digits()
    scans = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    grey = np.stack([
        np.asarray(Image.fromarray(scan).resize((SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE), Image.BILINEAR))
        for scan in scans
    ])
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb.setflags(write=False)
    return rgb, digits.target.astype(np.int64)


@functools.lru_cache(maxsize=4)
def generate_shapes(size: int) -> tuple[np.ndarray, np.ndarray]:
    """`size` labelled 32 x 32 RGB uint8 images of 10 shape/texture classes (class = index mod 10).

    Each image: a random background colour, one shape or textured rectangle in a foreground colour
    that differs from the background by 80..176 levels per channel, random position and size, then
    uniform integer noise of +-24 levels. Only a seeded numpy Generator and exact float arithmetic
    (+, -, *, /, floor, mod: no libm calls) are used, so the bytes are identical on every machine.
    """
    rng = np.random.default_rng(SHAPES_SEED)
    labels = np.arange(size, dtype=np.int64) % len(SHAPES_CLASSES)
    images = np.stack([_draw_shape(rng, int(label)) for label in labels])
    images.setflags(write=False)
    return images, labels


def _draw_shape(rng: np.random.Generator, label: int) -> np.ndarray:
    background = rng.integers(0, 256, size=3)
    foreground = (background + rng.integers(80, 177, size=3)) % 256
    mask = _SHAPE_MASKS[label](rng)
    image = np.where(mask[..., None], foreground, background)
    noise = rng.integers(-_SHAPES_NOISE, _SHAPES_NOISE + 1, size=image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _centre(rng: np.random.Generator, radius: float) -> tuple[float, float]:
    """A centre that keeps a shape of this radius one pixel inside the image."""
    return tuple(rng.uniform(radius + 1, SMALL_IMAGE_SIZE - radius - 1, size=2))


def _squared_distance(rng: np.random.Generator, radius: float) -> np.ndarray:
    cx, cy = _centre(rng, radius)
    return (_GRID_X - cx) ** 2 + (_GRID_Y - cy) ** 2


def _circle(rng: np.random.Generator) -> np.ndarray:
    radius = rng.uniform(5, 12)
    return _squared_distance(rng, radius) <= radius * radius


def _ring(rng: np.random.Generator) -> np.ndarray:
    outer = rng.uniform(7, 13)
    inner = outer - rng.uniform(2, 4)
    distance = _squared_distance(rng, outer)
    return (distance <= outer * outer) & (distance >= inner * inner)


def _square(rng: np.random.Generator) -> np.ndarray:
    half = rng.uniform(4, 11)
    cx, cy = _centre(rng, half)
    return (np.abs(_GRID_X - cx) <= half) & (np.abs(_GRID_Y - cy) <= half)


def _triangle(rng: np.random.Generator) -> np.ndarray:
    """Upright isosceles triangle: its half-width grows linearly from the apex to the base."""
    half = rng.uniform(5, 12)
    cx, cy = _centre(rng, half)
    top, bottom = cy - half, cy + half
    depth = (_GRID_Y - top) / (bottom - top)
    return (depth >= 0) & (depth <= 1) & (np.abs(_GRID_X - cx) <= half * depth)


def _cross(rng: np.random.Generator) -> np.ndarray:
    arm = rng.uniform(6, 12)
    thickness = rng.uniform(1.5, 3)
    cx, cy = _centre(rng, arm)
    dx, dy = np.abs(_GRID_X - cx), np.abs(_GRID_Y - cy)
    return ((dx <= thickness) & (dy <= arm)) | ((dy <= thickness) & (dx <= arm))


def _texture_region(rng: np.random.Generator) -> np.ndarray:
    """A random rectangle of 18..32 px per side that a texture fills."""
    width, height = rng.integers(18, SMALL_IMAGE_SIZE + 1, size=2)
    x0 = rng.integers(0, SMALL_IMAGE_SIZE - width + 1)
    y0 = rng.integers(0, SMALL_IMAGE_SIZE - height + 1)
    return (_GRID_X >= x0) & (_GRID_X < x0 + width) & (_GRID_Y >= y0) & (_GRID_Y < y0 + height)


def _stripes(coordinate: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Alternating bands of a random width (2..4 px) and phase along `coordinate`."""
    band = rng.uniform(2, 4)
    phase = rng.uniform(0, 2 * band)
    return np.floor((coordinate + phase) / band) % 2 == 0


def _horizontal_stripes(rng: np.random.Generator) -> np.ndarray:
    return _texture_region(rng) & _stripes(_GRID_Y, rng)


def _vertical_stripes(rng: np.random.Generator) -> np.ndarray:
    return _texture_region(rng) & _stripes(_GRID_X, rng)


def _diagonal_stripes(rng: np.random.Generator) -> np.ndarray:
    region = _texture_region(rng)
    direction = 1.0 if rng.integers(0, 2) else -1.0
    return region & _stripes(_GRID_X + direction * _GRID_Y, rng)


def _checkerboard(rng: np.random.Generator) -> np.ndarray:
    region = _texture_region(rng)
    cell = rng.uniform(2.5, 5)
    px, py = rng.uniform(0, 2 * cell, size=2)
    return region & ((np.floor((_GRID_X + px) / cell) + np.floor((_GRID_Y + py) / cell)) % 2 == 0)


def _dots(rng: np.random.Generator) -> np.ndarray:
    region = _texture_region(rng)
    spacing = rng.uniform(5, 8)
    radius = rng.uniform(1.2, 0.35 * spacing)
    px, py = rng.uniform(0, spacing, size=2)
    dx = np.mod(_GRID_X + px, spacing) - spacing / 2
    dy = np.mod(_GRID_Y + py, spacing) - spacing / 2
    return region & (dx * dx + dy * dy <= radius * radius)


_SHAPE_MASKS: tuple[Callable[[np.random.Generator], np.ndarray], ...] = (
    _circle, _square, _triangle, _cross, _ring,
    _horizontal_stripes, _vertical_stripes, _checkerboard, _diagonal_stripes, _dots,
)


def _hash_lines(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
