"""Atomic file writes: a reader sees the old file or the complete new one, never half of one.

Every file mokd writes (results JSON, feature cache, checkpoints) goes through here: write to a
temporary file in the same directory, flush and fsync, then `os.replace` onto the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`, on error removed."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
    return _write_with(path, lambda tmp: tmp.write_text(text))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return _write_with(path, lambda tmp: tmp.write_text(text))


def save_numpy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save one array in `.npy` format, atomically (np.save would append `.npy` to a temp name)."""

    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    return _write_with(path, writer)


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save`, atomically: an interrupted save never replaces a good checkpoint."""
    return _write_with(path, lambda tmp: torch.save(obj, tmp))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _write_with(path, lambda tmp: tmp.write_bytes(data))
