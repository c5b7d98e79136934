"""The one place where user-given options and output locations are checked, before any work starts.

Every command (evaluation and training) validates through these functions, so that a bad value gets the
same one-line `MokdError` with the allowed range wherever it is given, and an output that cannot be
written is found before minutes of computation are spent, not when the result is about to be saved.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from mokd_eval.errors import MokdError
from mokd_eval.registry import ArchSpec

MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 2048
MAX_NUM_WORKERS = 64
DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("fp32", "bf16", "fp16")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_image_size(size: int | None, spec: ArchSpec | None = None, *, option: str = "--image-size") -> int | None:
    """A resolution in [8, 2048] px; with an architecture, also one it can take (patch multiple, >= stride)."""
    if size is None:
        return None
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise MokdError(f"{option} {size} is out of range: use {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels")
    if spec is None:
        return size
    if spec.is_vit and size % spec.patch_size:
        lower = max(spec.patch_size, size - size % spec.patch_size)
        raise MokdError(f"{option} {size} is not a multiple of {spec.name}'s patch size {spec.patch_size}: "
                        f"use e.g. {lower} or {lower + spec.patch_size}")
    stride = resnet_stride(spec)
    if stride is not None and size < stride:
        raise MokdError(f"{option} {size} is below {spec.name}'s output stride {stride}: its last feature map "
                        f"would be empty; use at least {stride}")
    return size


def resnet_stride(spec: ArchSpec) -> int | None:
    """Total downsampling of a ResNet (8 for the CIFAR stem, 32 for ImageNet's); None for a ViT."""
    if spec.is_vit:
        return None
    return 8 if spec.stem == "cifar" else 32


def check_num_workers(count: int | None, *, option: str = "--num-workers") -> int | None:
    """None means "sized to the machine" (decided where the loader is built)."""
    if count is None:
        return None
    if not 0 <= count <= MAX_NUM_WORKERS:
        raise MokdError(f"{option} {count} is out of range: use 0 (load in the main process) to {MAX_NUM_WORKERS}")
    return count


def check_positive(value: int | float | None, option: str) -> int | float | None:
    if value is not None and value <= 0:
        raise MokdError(f"{option} must be positive, got {value}")
    return value


def check_device(text: str, *, option: str = "--device") -> str:
    """Syntax only: whether CUDA exists is decided when the device is chosen."""
    normalised = text.strip().lower()
    if not _DEVICE.match(normalised):
        raise MokdError(f"{option} {text!r} is not a device mokd supports: use {DEVICE_FORMS}")
    return normalised


def check_output_file(path: Path, *, option: str = "--out") -> Path:
    """A file we will (atomically) write: not a directory, and its directory creatable and writable."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise MokdError(f"{option} {path} is a directory: give a file name such as {path / 'results.json'}")
    _check_writable_directory(path.parent, what=f"{option} {path}")
    return path


def check_output_dir(path: Path, *, option: str) -> Path:
    """A directory we will write into: not a file, and creatable and writable."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise MokdError(f"{option} {path} is a file, not a directory: give a directory path")
    _check_writable_directory(path, what=f"{option} {path}")
    return path


def _check_writable_directory(directory: Path, *, what: str) -> None:
    """Probe by creating (and removing) a temporary file in the directory or, if it does not exist yet,
    in its nearest existing ancestor: permission bits alone mislead (root, read-only mounts)."""
    existing = directory
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise MokdError(f"{what}: cannot be created because {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise MokdError(f"{what}: cannot write in {existing} ({reason}); choose a writable location") from None



def check_precision(precision: str, *, option: str = "--precision") -> str:
    """fp32 (the paper's), or bf16 / fp16 autocast, which only CUDA runs faster."""
    if precision not in PRECISIONS:
        raise MokdError(f"{option} {precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision
