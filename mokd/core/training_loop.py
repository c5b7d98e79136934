"""The pieces every training loop of mokd shares: autocast, the gradient scaler's step, RNG state, resume state.

Three loops train in mokd (the supervised engine of the protocols, the MOKD trainer, the COCO detector); each
keeps its own schedule and bookkeeping, and takes from here what must behave the same in all of them: the
precision a run asks for, one optimizer update with or without fp16 loss scaling, the random state a resumed
run continues from, and the optimizer/scaler part of a resume file. The feature extractor uses the same autocast.
"""

from __future__ import annotations

import random
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import numpy as np
import torch

from mokd.core.errors import MokdError
from mokd.core.validation import check_precision

_PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- precision ------------------------------------------------------------------------------------


def precision_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of `--precision` (None = fp32, the paper's precision and the default).

    bf16 / fp16 are CUDA autocast; on a CPU they are refused, because they are slower there and a run must
    record the precision it really used."""
    if check_precision(precision) != "fp32" and device.type != "cuda":
        raise MokdError(f"--precision {precision} needs a CUDA device (on a CPU it is slower, not faster): "
                        "use --precision fp32")
    return _PRECISION_DTYPES[precision]


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the trainer's `--amp` (None = full precision): auto = bf16 on CUDA, none on CPU."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "fp16" and device.type != "cuda":
        raise MokdError("--amp fp16 needs a CUDA device: use --amp bf16 or none on CPU")
    return _AMP_DTYPES[amp]


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """The forward's autocast to `dtype` on `device`; a no-op context for full precision (dtype None)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 training (its narrow range needs loss scaling); None for every other dtype."""
    return torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def autocast_for(device: torch.device, precision: str) -> tuple[AbstractContextManager, torch.amp.GradScaler | None]:
    """The forward's autocast for `--precision` and, for fp16 training, its gradient scaler (None otherwise)."""
    dtype = precision_dtype(device, precision)
    return autocast_context(device, dtype), make_scaler(dtype)


# --- one update -----------------------------------------------------------------------------------


def scale_loss(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """The loss to back-propagate: multiplied by the fp16 loss scale, unchanged without a scaler."""
    return loss if scaler is None else scaler.scale(loss)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None, *,
                   before_step: Callable[[], None] | None = None) -> None:
    """One update from the gradients back-propagated so far, which are then freed.

    `before_step` (gradient clipping, holding parameters) sees the true gradients: with a scaler they are
    unscaled first. With a scaler a step whose gradients hold inf/NaN is skipped and the scale lowered."""
    if before_step is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        before_step()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def clip_gradients_per_tensor(parameters: list[torch.nn.Parameter], max_norm: float) -> None:
    """Clip each gradient tensor to its own norm `max_norm` (DINO's clip_gradients), not the global norm."""
    for param in parameters:
        if param.grad is not None:
            torch.nn.utils.clip_grad_norm_(param, max_norm, foreach=False)


# --- resume state ---------------------------------------------------------------------------------


def capture_rng(*, numpy_and_python: bool = False) -> dict[str, Any]:
    """The RNG states a resumed run continues from, as tensors and lists (weights_only-safe): torch on the CPU
    and every CUDA device, and with `numpy_and_python` also numpy's and python's global generators."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if numpy_and_python:
        _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_cached = np.random.get_state()
        version, python_state, python_gauss = random.getstate()
        state["numpy"] = {"keys": torch.from_numpy(numpy_keys.astype(np.int64)), "pos": int(numpy_pos),
                          "has_gauss": int(numpy_has_gauss), "cached_gaussian": float(numpy_cached)}
        state["python"] = [version, list(python_state), python_gauss]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the generators `capture_rng` recorded (numpy and python only when they were recorded)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        numpy = state["numpy"]
        np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                             numpy["has_gauss"], numpy["cached_gaussian"]))
    if "python" in state:
        version, python_state, python_gauss = state["python"]
        random.setstate((version, tuple(python_state), python_gauss))


def scaler_state(scaler: torch.amp.GradScaler | None) -> dict[str, Any] | None:
    """What a resume file stores for a gradient scaler: its state, None when the run has none."""
    return scaler.state_dict() if scaler is not None else None


def restore_optimization(state: dict[str, Any], optimizer: torch.optim.Optimizer,
                         scaler: torch.amp.GradScaler | None) -> None:
    """Load the `optimizer` and `scaler` entries of a resume file (a stored scaler state is used only when this
    run scales its losses too)."""
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
