"""Reading checkpoint files and deciding whether to trust them: the one place files are opened.

Why: a pickled checkpoint can run code when unpickled, so every file is read with `weights_only=True`
(tensors and containers only); a file that needs more is refused with the global it asks for, unless
`--trust-checkpoint` is given. `.safetensors` files need no unpickling at all.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from mokd.core.errors import MokdError

MODULE_PREFIX = "module."
# Classes a checkpoint may hold besides tensors and containers: DINO stores its argparse options.
SAFE_GLOBALS = [argparse.Namespace]
TRUSTED = "unpickled_with_trust"  # meta flag: the file was loaded with weights_only=False
HASH_CHUNK_BYTES = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, memoised while the file is unchanged (checkpoints are large and re-read)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _sha256_of(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """`size` and `mtime_ns` only key the cache: a rewritten file is hashed again."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_is_file(path: Path) -> None:
    """Fail early and clearly: never let a missing file fall through to some other weights."""
    if not path.exists():
        raise MokdError(f"checkpoint {path} does not exist: check the path (nothing is loaded in its place)")
    if path.is_dir():
        raise MokdError(f"checkpoint {path} is a directory: pass the checkpoint file inside it")
    if path.stat().st_size == 0:
        raise MokdError(f"checkpoint {path} is an empty file: the save was probably interrupted; use another file")


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length followed by a JSON object."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") < path.stat().st_size


def _unreadable(path: Path, error: BaseException) -> MokdError:
    """One line from torch's or safetensors' multi-line complaint: its first sentence that says what failed."""
    text = str(error).split("WeightsUnpickler error:")[-1].strip()
    detail = re.split(r"\.\s|\n", text, maxsplit=1)[0][:160] if text else "no detail"
    return MokdError(f"checkpoint {path} cannot be read (truncated, corrupted or not a PyTorch/safetensors "
                     f"checkpoint): {type(error).__name__}: {detail}")


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return safetensors.torch.load_file(str(path), device="cpu"), {"origin": "safetensors", **metadata}
    except Exception as error:  # the safetensors reader has one error type for every defect
        raise _unreadable(path, error) from None


def _load_trusted(path: Path, blocked: str) -> tuple[Any, dict[str, Any]]:
    """Full unpickling, only ever reached with --trust-checkpoint and a file that needs it."""
    warnings.warn(f"{path}: unpickling with --trust-checkpoint (weights_only=False); the file may run code",
                  stacklevel=4)
    try:
        return torch.load(path, map_location="cpu", weights_only=False), {"origin": "torch", TRUSTED: True}
    except (ImportError, AttributeError) as error:  # the pickled code refers to a module or name we lack
        raise MokdError(f"checkpoint {path} cannot be unpickled even with --trust-checkpoint: it refers to "
                        f"{blocked}, which this environment cannot import ({type(error).__name__}: {error}); "
                        f"load it where that code is installed and re-save its state_dict") from None
    except Exception as error:
        raise _unreadable(path, error) from None


def load_object(path: str | os.PathLike, *, trust: bool = False) -> tuple[Any, dict[str, Any]]:
    """Unpickle tensors and containers only (the one place files are opened). Returns the object and what
    the file itself says: `origin` and, for safetensors, its metadata."""
    path = Path(path)
    _check_is_file(path)
    if _is_safetensors(path):
        return _load_safetensors(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True), {"origin": "torch"}
    except pickle.UnpicklingError as error:
        blocked = _blocked_global(str(error))
        if blocked is None:
            raise _unreadable(path, error) from None
        if not trust:
            raise MokdError(f"checkpoint {path} was refused by the safe loader: it contains the Python global "
                            f"{blocked}, which unpickling would import and may run as code; pass "
                            f"--trust-checkpoint to run it, only if you trust the file's source") from None
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError... for damaged files
        raise _unreadable(path, error) from None
    return _load_trusted(path, blocked)


def load_resume_state(path: Path, keys: set[str]) -> dict[str, Any]:
    """A per-epoch resume file that mokd wrote (`linear`, fine-tuning), holding at least `keys`: loaded with
    tensors and containers only, never trusted; a damaged or foreign file is a one-line error saying how to
    start that training over."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for damaged files
        blocked = _blocked_global(str(error)) if isinstance(error, pickle.UnpicklingError) else None
        reason = (f"it holds the Python global {blocked}, which no resume file of mokd holds" if blocked
                  else f"truncated or corrupted: {type(error).__name__}")
    else:
        missing = sorted(keys - set(state)) if isinstance(state, dict) else sorted(keys)
        reason = f"not a mokd resume file: it lacks {', '.join(missing)}" if missing else ""
    if reason:
        raise MokdError(f"cannot resume from {path} ({reason}); delete it to start that training afresh, "
                        "or drop --resume")
    return state


def _blocked_global(message: str) -> str | None:
    """The global the weights-only unpickler refused, from its message (its wording varies across torch
    releases: "GLOBAL x.y was not an allowed global", "unsupported GLOBAL x.y whose module x is blocked")."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return match.group(1) if match else None


def strip_module_prefix(state: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Names without DistributedDataParallel's `module.` prefix; a name saved both with and without it is
    refused rather than one silently overwriting the other."""
    stripped = {name.removeprefix(MODULE_PREFIX): value for name, value in state.items()}
    if len(stripped) != len(state):
        raise MokdError(f"{where} holds the same tensor with and without the 'module.' prefix: "
                        "it cannot be loaded unambiguously")
    return stripped
