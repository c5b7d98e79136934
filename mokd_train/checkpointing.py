"""Training checkpoints: the native layout, resuming, the official MOKD export, and --init-from.

Native layout (read by mokd/core/checkpoints/): `mokd_format`, `archs`, `student1/2`, `teacher1/2`
(raw module state dicts, no `module.` prefix), `epoch` (finished epochs), `step_in_epoch`,
`global_step`, `config`, `mode`, `centers`, `optimizer1/2`, `scaler1/2` (or None) and `rng`. Only
tensors and plain Python values, so everything loads with `torch.load(weights_only=True)`.

Every write is atomic. Before `checkpoint.pth` is replaced, the previous one is renamed (atomically)
to `checkpoint_prev.pth`, so a checkpoint damaged on disk still leaves an older one to resume from.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mokd.core.atomic import save_torch
from mokd.core.checkpoints import load_object, strip_module_prefix
from mokd.core.errors import MokdError
from mokd.core.registry import ALIASES, TIMM_NAMES, ArchSpec
from mokd.core.training_loop import capture_rng, restore_rng, scaler_state
from mokd_train.pair import MokdPair, feature_stride

FORMAT_VERSION = 1
LATEST = "checkpoint.pth"
PREVIOUS = "checkpoint_prev.pth"
UNREADABLE = "checkpoint_unreadable.pth"
NUMBERED = re.compile(r"checkpoint_(\d{4,})\.pth$")
NETWORKS = ("student1", "teacher1", "student2", "teacher2")
OFFICIAL_DIR = "official"
OFFICIAL_EXPERIMENT = "mokd"
# Official arch names (DINO's), from our aliases: the inverse of the registry's DINO-name table.
OFFICIAL_ARCH_NAMES = {alias: official for official, alias in TIMM_NAMES.items()}
# Our per-model center names -> the official code's loss modules (each saved as {"center": 1×K}).
OFFICIAL_LOSS_KEYS = {"sm": "loss_{family}_fn", "st": "loss_{family}_thead_fn", "cm": "loss_{family}_ct_fn"}
Log = Callable[[str], None]


@dataclass
class Progress:
    """Where training stands: finished epochs, steps done in the current epoch, steps done in total."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


def numbered_name(epoch: int) -> str:
    return f"checkpoint_{epoch:04d}.pth"


def native_state(pair: MokdPair, optimizers: list[torch.optim.Optimizer], scalers: list[Any],
                 progress: Progress, config: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to resume, in the native layout."""
    state: dict[str, Any] = {
        "mokd_format": FORMAT_VERSION,
        "archs": {"1": pair.specs[0].to_dict(), "2": pair.specs[1].to_dict()},
        "epoch": progress.epoch,
        "step_in_epoch": progress.step_in_epoch,
        "global_step": progress.global_step,
        "config": config,
        "mode": pair.cfg.mode,
        "centers": pair.centers_state_dict(),
        "rng": capture_rng(numpy_and_python=True),
    }
    state.update(_method_state(pair))
    for index in (0, 1):
        state[f"student{index + 1}"] = pair.students[index].state_dict()
        if index < len(pair.teachers):  # DoGo has no teachers
            state[f"teacher{index + 1}"] = pair.teachers[index].state_dict()
        state[f"optimizer{index + 1}"] = optimizers[index].state_dict()
        state[f"scaler{index + 1}"] = scaler_state(scalers[index])
    return state


def _method_state(pair) -> dict[str, Any]:
    """Issue 10: which method wrote the file, what mokd-eval evaluates by default, and state outside the
    networks (MCL's queues). Absent from MOKD checkpoints, whose layout is unchanged."""
    if isinstance(pair, MokdPair):
        return {}
    return {"method": pair.method, "eval_keys": list(pair.eval_keys), "method_state": pair.method_state_dict()}


def save_checkpoint(output_dir: Path, state: dict[str, Any], *, numbered: bool, official: bool) -> Path:
    """Write `checkpoint.pth` (keeping the previous one as `checkpoint_prev.pth`), optionally a numbered
    copy and the official-layout files. Returns the path of `checkpoint.pth`."""
    latest = output_dir / LATEST
    if latest.exists():
        latest.replace(output_dir / PREVIOUS)
    save_torch(state, latest)
    if official:
        save_torch(official_state(state, _specs_of(state)), official_path(output_dir, _specs_of(state)))
    if numbered:
        save_numbered_copies(output_dir, state, official=official)
    return latest


def save_numbered_copies(output_dir: Path, state: dict[str, Any], *, official: bool) -> None:
    """The numbered copy of the epoch `state` ends (and its official-layout twin)."""
    save_torch(state, output_dir / numbered_name(state["epoch"]))
    if official:
        # The official code numbers its copies by the 0-based index of the epoch just finished.
        save_torch(official_state(state, _specs_of(state)),
                   official_path(output_dir, _specs_of(state), f"{state['epoch'] - 1:04d}"))


def official_path(output_dir: Path, specs: tuple[ArchSpec, ArchSpec], suffix: str = "temp") -> Path:
    return output_dir / OFFICIAL_DIR / f"{official_stem(specs)}_{suffix}.pth"


def _specs_of(state: dict[str, Any]) -> tuple[ArchSpec, ArchSpec]:
    return tuple(ArchSpec.from_dict(state["archs"][key]) for key in ("1", "2"))


def write_missing_numbered_copy(output_dir: Path, state: dict[str, Any], *, save_every: int, epochs: int,
                                official: bool, log: Log) -> None:
    """After a crash between `checkpoint.pth` and its numbered copy (kill -9 mid-save), write the copy the
    interrupted run owed, so that every `--save-every` epoch has one."""
    epoch = state["epoch"]
    owed = state["step_in_epoch"] == 0 and epoch > 0 and (epoch % save_every == 0 or epoch == epochs)
    path = output_dir / numbered_name(epoch)
    if owed and not path.exists():
        save_numbered_copies(output_dir, state, official=official)
        log(f"wrote {path.name}, which the interrupted run had not finished writing")


def remove_stale_temporaries(output_dir: Path, log: Log) -> None:
    """Delete the temporary files an interrupted atomic save leaves (`.<name>.<random>.tmp`); only one run
    writes into an output directory, so at start-up any such file is an orphan."""
    stale = [path for folder in (output_dir, output_dir / OFFICIAL_DIR) if folder.is_dir()
             for path in folder.glob(".*.pth.*.tmp")]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log(f"removed {len(stale)} temporary file(s) left by an interrupted save in {output_dir}")


def non_finite_networks(state: dict[str, Any]) -> list[str]:
    """Which networks and optimizers of a native state hold NaN or inf. One float64 sum per tensor is enough:
    a sum is finite exactly when every element is (finite weights do not reach 1e308)."""
    named = [*NETWORKS, "optimizer1", "optimizer2"]
    return [name for name in named if not _all_finite(state.get(name))]


def _all_finite(tree: Any) -> bool:
    if isinstance(tree, torch.Tensor):
        return not tree.is_floating_point() or bool(torch.isfinite(tree.sum(dtype=torch.float64)))
    if isinstance(tree, dict):
        return all(_all_finite(value) for value in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(_all_finite(value) for value in tree)
    return True


# --- resume ---------------------------------------------------------------------------------------


def _try_load(path: Path, log: Log) -> dict[str, Any] | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file raises whatever the unpickler or zip reader hits
        log(f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); trying an older one")
        return None
    if not isinstance(state, dict) or state.get("mokd_format") != FORMAT_VERSION:
        log(f"checkpoint {path} is not a mokd training checkpoint; trying an older one")
        return None
    poisoned = non_finite_networks(state)
    if poisoned:
        log(f"checkpoint {path} holds non-finite values in {', '.join(poisoned)}; trying an older one")
        return None
    return state


def find_resume_state(output_dir: Path, log: Log) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint in `output_dir`: `checkpoint.pth`, else the most advanced of
    `checkpoint_prev.pth` and the numbered copies. None when the directory has no checkpoint at all."""
    latest = output_dir / LATEST
    if latest.exists():
        state = _try_load(latest, log)
        if state is not None:
            return state, latest
    numbered = sorted((path for path in output_dir.glob("checkpoint_*.pth") if NUMBERED.search(path.name)),
                      key=lambda path: int(NUMBERED.search(path.name).group(1)), reverse=True)
    fallbacks: list[tuple[dict[str, Any], Path]] = []
    previous = output_dir / PREVIOUS
    if previous.exists() and (state := _try_load(previous, log)) is not None:
        fallbacks.append((state, previous))
    for path in numbered:
        if (state := _try_load(path, log)) is not None:
            fallbacks.append((state, path))
            break
    if not fallbacks:
        if latest.exists() or previous.exists() or numbered:
            raise MokdError(f"no readable checkpoint in {output_dir}: every checkpoint file failed to load; "
                            f"move them away or use another --output-dir to start afresh")
        return None
    return max(fallbacks, key=lambda found: found[0]["global_step"])


def set_aside_unreadable_latest(output_dir: Path, resumed_from: Path, log: Log) -> None:
    """After resuming from a fallback, rename the unreadable `checkpoint.pth` so that the next save's
    rotation does not move it over the good `checkpoint_prev.pth`; it is kept for inspection."""
    latest = output_dir / LATEST
    if resumed_from != latest and latest.exists():
        unreadable = output_dir / UNREADABLE
        latest.replace(unreadable)
        log(f"moved the unreadable {latest.name} to {unreadable}")


def check_compatible(state: dict[str, Any], path: Path, specs: tuple[ArchSpec, ArchSpec], mode: str,
                     method: str = "mokd") -> None:
    """Refuse to continue a run of other models, another mode or another method in the same directory."""
    saved = tuple(ArchSpec.from_dict(state["archs"][key]) for key in ("1", "2"))
    saved_method = state.get("method", "mokd")
    if saved != specs or state["mode"] != mode or saved_method != method:
        def run(which: str, run_mode: str) -> str:
            return run_mode if which == "mokd" else f"{which} {run_mode}"

        grids = ("" if [s.img_size for s in saved] == [s.img_size for s in specs] else
                 f" (position grids for {saved[0].img_size} px, not {specs[0].img_size}: see position_size)")
        raise MokdError(f"{path} holds a {run(saved_method, state['mode'])} run of {saved[0].name} + {saved[1].name}, "
                        f"but the config asks for {run(method, mode)} with {specs[0].name} + {specs[1].name}{grids}: "
                        f"use another --output-dir or --no-resume")


def _check_same_optimizer_kind(saved: dict[str, Any], optimizer: torch.optim.Optimizer, path: Path,
                               index: int) -> None:
    """torch loads an SGD state into AdamW (and back) without complaint and fails at the first step; the
    hyperparameters of the first group tell the two families apart (`betas` only in Adam-type optimizers)."""
    def family(group: dict[str, Any]) -> str:
        return "Adam-type" if "betas" in group else "SGD"

    saved_family, built_family = family(saved["param_groups"][0]), family(optimizer.param_groups[0])
    if saved_family != built_family:
        raise MokdError(f"{path} trained model {index + 1} with {saved_family} but the config builds "
                        f"{built_family} (see --cnn-optimizer): resume with the original settings or use another "
                        f"--output-dir")


def restore(state: dict[str, Any], path: Path, pair: MokdPair, optimizers: list[torch.optim.Optimizer],
            scalers: list[Any]) -> Progress:
    """Load weights, teachers, centers, optimizers, scalers and RNG from a native checkpoint."""
    try:
        for index in (0, 1):
            pair.students[index].load_state_dict(state[f"student{index + 1}"])
            if index < len(pair.teachers):
                pair.teachers[index].load_state_dict(state[f"teacher{index + 1}"])
            _check_same_optimizer_kind(state[f"optimizer{index + 1}"], optimizers[index], path, index)
            optimizers[index].load_state_dict(state[f"optimizer{index + 1}"])
            if scalers[index] is not None:
                if state[f"scaler{index + 1}"] is None:
                    raise MokdError(f"{path} was trained without fp16 loss scaling: resume with the same --amp")
                scalers[index].load_state_dict(state[f"scaler{index + 1}"])
    except (RuntimeError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise MokdError(f"{path} does not match the model this config builds ({first_line}): resume with the "
                        f"original settings or use another --output-dir") from None
    pair.load_centers_state_dict(state["centers"])
    if not isinstance(pair, MokdPair):
        pair.load_method_state_dict(state.get("method_state", {}))
    restore_rng(state["rng"])
    return Progress(state["epoch"], state["step_in_epoch"], state["global_step"])


# --- official MOKD layout -------------------------------------------------------------------------


def official_arch_name(spec: ArchSpec) -> str:
    """DINO/MOKD arch name ('resnet50', 'vit_small'...) of a standard backbone; error otherwise."""
    alias = ALIASES.get(spec.name)
    name = OFFICIAL_ARCH_NAMES.get(spec.name)
    if alias is None or name is None or spec != ArchSpec(**{**alias.to_dict(), "img_size": spec.img_size,
                                                           "patch_size": spec.patch_size}):
        raise MokdError(f"{spec.describe()} has no official MOKD architecture name: --export-official needs a "
                        f"standard ResNet (r18/r34/r50/r101/r152, imagenet stem) and a standard ViT")
    return name


def cnn_vit_indices(specs: tuple[ArchSpec, ArchSpec], purpose: str) -> tuple[int, int]:
    """(index of the ResNet, index of the ViT); the official layout exists only for such pairs."""
    families = [spec.is_vit for spec in specs]
    if sorted(families) != [False, True]:
        raise MokdError(f"{purpose} needs a CNN-ViT pair (the official MOKD layout has one of each), "
                        f"got {specs[0].name} + {specs[1].name}")
    return families.index(False), families.index(True)


def official_stem(specs: tuple[ArchSpec, ArchSpec]) -> str:
    cnn, vit = cnn_vit_indices(specs, "--export-official")
    return (f"mokd_{official_arch_name(specs[cnn])}.{official_arch_name(specs[vit])}"
            f"_pretrain_{OFFICIAL_EXPERIMENT}")


def official_state(native: dict[str, Any], specs: tuple[ArchSpec, ArchSpec]) -> dict[str, Any]:
    """The official checkpoint dict: `module.` on every network but teacher_vit (as DDP-saved there)."""
    cnn, vit = cnn_vit_indices(specs, "--export-official")
    for network in NETWORKS:
        extra = [key for key in native[network] if key.startswith("transhead.input_proj")]
        if extra:
            raise MokdError(f"{network} has a T-Head input projection (thead_dim differs from the ViT width), "
                            f"which the official layout cannot hold: export without --thead-dim")

    def prefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"module.{key}": value for key, value in state.items()}

    exported: dict[str, Any] = {
        "student_cnn": prefixed(native[f"student{cnn + 1}"]),
        "teacher_cnn": prefixed(native[f"teacher{cnn + 1}"]),
        "student_vit": prefixed(native[f"student{vit + 1}"]),
        "teacher_vit": dict(native[f"teacher{vit + 1}"]),
        "optimizer_cnn": native[f"optimizer{cnn + 1}"],
        "optimizer_vit": native[f"optimizer{vit + 1}"],
        "epoch": native["epoch"],
        "arch_cnn": official_arch_name(specs[cnn]),
        "arch_vit": official_arch_name(specs[vit]),
    }
    for family, index in (("cnn", cnn), ("vit", vit)):
        for term, key in OFFICIAL_LOSS_KEYS.items():
            exported[key.format(family=family)] = {"center": native["centers"][f"{term}{index + 1}"]}
        if native[f"scaler{index + 1}"] is not None:
            exported[f"fp16_scaler_{family}"] = native[f"scaler{index + 1}"]
    return exported


# --- --init-from ----------------------------------------------------------------------------------


def _networks_and_centers(raw: Any, path: Path,
                          specs: tuple[ArchSpec, ArchSpec]) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Per-network state dicts (our names) and centers from a native or an official MOKD checkpoint."""
    if isinstance(raw, dict) and raw.get("mokd_format") == FORMAT_VERSION:
        return {name: raw[name] for name in NETWORKS}, raw["centers"]
    official_keys = ("student_cnn", "teacher_cnn", "student_vit", "teacher_vit")
    if not (isinstance(raw, dict) and all(key in raw for key in official_keys)):
        raise MokdError(f"{path} is neither a mokd training checkpoint nor an official MOKD checkpoint "
                        f"(expected keys {', '.join(official_keys)})")
    cnn, vit = cnn_vit_indices(specs, "--init-from an official MOKD checkpoint")
    for family, index in (("cnn", cnn), ("vit", vit)):
        wanted = official_arch_name(specs[index])
        if raw.get(f"arch_{family}", wanted) != wanted:
            raise MokdError(f"{path} holds a {raw[f'arch_{family}']} {family.upper()}, but the config trains "
                            f"{specs[index].name} ({wanted})")
    networks = {}
    for family, index in (("cnn", cnn), ("vit", vit)):
        for role in ("student", "teacher"):
            key = f"{role}_{family}"
            networks[f"{role}{index + 1}"] = strip_module_prefix(raw[key], f"{path} '{key}'")
    centers = {}
    for family, index in (("cnn", cnn), ("vit", vit)):
        for term, key in OFFICIAL_LOSS_KEYS.items():
            loss_key = key.format(family=family)
            if loss_key not in raw:
                raise MokdError(f"{path} has no {loss_key!r} (its center): it is not a complete MOKD checkpoint")
            centers[f"{term}{index + 1}"] = raw[loss_key]["center"]
    return networks, centers


# Position embeddings of a network, and how many leading entries are not grid cells (the ViT's class token).
POSITION_EMBEDDINGS = {"backbone.pos_embed": 1, "transhead.pos_embed": 0}


@dataclass
class InitSource:
    """The networks (our names, no `module.` prefix) and centers of an --init-from checkpoint, read once."""

    path: Path
    networks: dict[str, dict[str, torch.Tensor]]
    centers: dict[str, torch.Tensor]


def read_init_source(path: Path, specs: tuple[ArchSpec, ArchSpec]) -> InitSource:
    """Read a native or official MOKD checkpoint for --init-from (the architectures are checked, not the shapes)."""
    raw, _ = load_object(path)
    networks, centers = _networks_and_centers(raw, path, specs)
    return InitSource(path, networks, centers)


def stored_position_size(source: InitSource, specs: tuple[ArchSpec, ArchSpec]) -> int | None:
    """The image size whose position grids are the ones stored (the official code keeps 224 px grids, 14x14 /
    7x7, whatever the crop size), so the networks can be built with exactly those grids. None: no grid stored."""
    grids: dict[str, tuple[int, int]] = {}  # "network.key" -> (side, pixels per cell)
    for name in NETWORKS:
        spec = specs[int(name[-1]) - 1]
        for key, prefix in POSITION_EMBEDDINGS.items():
            tensor = source.networks[name].get(key)
            if tensor is None:
                continue
            cells = tensor.shape[1] - prefix if tensor.ndim == 3 else 0
            side = math.isqrt(max(cells, 0))
            if side == 0 or side * side != cells:
                raise MokdError(f"--init-from {source.path}: {name}.{key} of shape {list(tensor.shape)} is not a "
                                f"square position grid")
            grids[f"{name}.{key}"] = (side, feature_stride(spec))
    if not grids:
        return None
    finest_side, finest_stride = min(grids.values(), key=lambda grid: grid[1])
    size = finest_side * finest_stride
    if any(size // stride != side for side, stride in grids.values()):
        found = ", ".join(f"{where} {side}x{side}" for where, (side, _) in grids.items())
        raise MokdError(f"--init-from {source.path}: its position grids ({found}) do not all come from one image "
                        f"size, so no position_size builds them")
    return size


def _load_network_strictly(module: nn.Module, state: dict[str, torch.Tensor], name: str, path: Path) -> int:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(key for key in set(expected) & set(state)
                      if tuple(expected[key].shape) != tuple(state[key].shape))
    if missing or unexpected or reshaped:
        details = "; ".join(f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                ("wrong shape", reshaped)) if keys)
        hint = ("; its position grids differ from the configured ones: leave position_size unset to build them as "
                "stored" if any(key.endswith("pos_embed") for key in reshaped) else "")
        raise MokdError(f"--init-from {path}: {name} does not match the configured model: {details}{hint}")
    module.load_state_dict(state)
    return len(state)


def initialise_from(source: InitSource, pair: MokdPair, log: Log) -> None:
    """Start all four networks and the centers from a checkpoint (strict; optimizers and epoch are not restored).
    Position grids are loaded as stored: build the pair with `stored_position_size` to take grids of another size."""
    modules = {"student1": pair.students[0], "teacher1": pair.teachers[0],
               "student2": pair.students[1], "teacher2": pair.teachers[1]}
    for name in NETWORKS:
        count = _load_network_strictly(modules[name], source.networks[name], name, source.path)
        log(f"loaded {count} tensors into {name} ({pair.specs[int(name[-1]) - 1].name}) from {source.path}")
    pair.load_centers_state_dict(source.centers)
    log(f"loaded {len(source.centers)} centers from {source.path}")
