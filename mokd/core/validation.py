"""The one place where user-given options and output locations are checked, before any work starts.

Every command (evaluation and training) validates through these functions, so that a bad value gets the
same one-line `MokdError` with the allowed range wherever it is given, and an output that cannot be
written is found before minutes of computation are spent, not when the result is about to be saved.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mokd.core.errors import MokdError
from mokd.core.registry import ArchSpec

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


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: always finite, and within these bounds (None = unbounded)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: `low` itself is refused (a quantity that must be positive)
    nonzero: bool = False  # True: 0 is refused inside the bounds (a 1-based index that also counts from the end)

    def allows(self, value: float) -> bool:
        if self.nonzero and value == 0:
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        if self.low is None:
            return "a non-zero finite number" if self.nonzero else "a finite number"
        lower = f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"a number {lower}" + ("" if self.high is None else f" and <= {self.high:g}")


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
FRACTION = Range(0, 1)
ANY_FINITE = Range()

# The numeric options of `mokd-eval`, by flag: every command's option of that name accepts these values.
# tests/test_cli_errors.py fails for a numeric option missing here, so a new option gets a rule.
EVAL_NUMBER_RULES: dict[str, Range] = {
    "--temperature": POSITIVE, "--lr": POSITIVE, "--percent": Range(0, 100, low_open=True),
    "--k": AT_LEAST_ONE, "--classes": AT_LEAST_ONE, "--images": AT_LEAST_ONE, "--layer": Range(nonzero=True),
    "--seed": NON_NEGATIVE, "--seeds": AT_LEAST_ONE, "--epochs": AT_LEAST_ONE, "--warmup-epochs": NON_NEGATIVE,
    "--batch-size": AT_LEAST_ONE, "--eval-batch-size": AT_LEAST_ONE, "--accum-steps": AT_LEAST_ONE,
    "--max-batch-per-step": AT_LEAST_ONE, "--num-workers": Range(0, MAX_NUM_WORKERS),
    "--image-size": Range(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), "--test-size": Range(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE),
    "--max-size": Range(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), "--iters": AT_LEAST_ONE, "--coco-iters": AT_LEAST_ONE,
    "--warmup-iters": AT_LEAST_ONE, "--rois-per-image": AT_LEAST_ONE, "--test-proposals": AT_LEAST_ONE,
    "--precise-bn-iters": NON_NEGATIVE, "--checkpoint-period": AT_LEAST_ONE,
    "--nodes": AT_LEAST_ONE, "--gpus-per-node": NON_NEGATIVE, "--time": POSITIVE,
}


def check_number(value: float | None, option: str, allowed: Range = ANY_FINITE) -> float | None:
    """NaN and infinity are never meaningful settings; bounds say where a value stops making sense."""
    if value is None or isinstance(value, bool):
        return value
    if not math.isfinite(value):
        raise MokdError(f"{option} {value} is not a finite number: use {allowed.describe()}")
    if not allowed.allows(value):
        raise MokdError(f"{option} {value:g} is out of range: use {allowed.describe()}")
    return value


def check_numeric_options(values: Mapping[str, Any], flags: Mapping[str, str],
                          rules: Mapping[str, Range] = EVAL_NUMBER_RULES) -> None:
    """Check every given number against its flag's rule; `flags` maps a parameter name to its flag."""
    for name, flag in flags.items():
        value = values.get(name)
        if isinstance(value, (int, float)):
            check_number(value, flag, rules.get(flag, ANY_FINITE))


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


def check_not_overwriting(path: Path, *, option: str, overwrite: bool) -> Path:
    """An existing file is another run's or the user's: replacing it must be asked for."""
    if path.exists() and not overwrite:
        raise MokdError(f"{option} {path} already exists: pass --overwrite to replace it, or choose another name")
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
