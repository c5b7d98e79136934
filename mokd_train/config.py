"""Every training setting in one dataclass, and how presets, a YAML file and flags combine into it.

Precedence: defaults < preset < YAML < explicit flags. The defaults are the paper's ImageNet recipe
(224/96 px crops, 8 locals, batch 256, 100 epochs, K = 65536, the README's crop scales); the presets
name the paper's model pairs, plus `tiny`, a CPU-sized pair for demos and tests. The resolved config
is printed and saved with every run, so a result always says exactly how it was trained.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mokd.core.data import parse_data_spec
from mokd.core.errors import MokdError
from mokd.core.registry import ArchSpec, meta_backbone, resolve_arch
from mokd.core.tensorboard_log import require_tensorboard
from mokd.core.validation import (FRACTION, NON_NEGATIVE, POSITIVE, Range, check_device, check_image_size,
                                  check_num_workers, check_number, check_output_dir)
from mokd_train.methods import DEFAULT_LAMBDAS, FAITHFUL_PEERS, METHODS, method_defaults, method_label

MODES = ("mokd", "independent")
LOSS_TERMS = ("sm", "st", "cm", "ct")
AMP_MODES = ("auto", "none", "bf16", "fp16")
CNN_OPTIMIZERS = ("sgd", "adamw")  # sgd: the official choice for a ResNet
AUGMENTATION_PROBABILITIES = ("flip_p", "jitter_p", "grayscale_p", "global1_blur_p", "global2_blur_p",
                              "local_blur_p", "solarize_p")
# Paper §4.5: the larger model learns fully from its partner, the smaller one only a little.
LAMBDA_LARGER, LAMBDA_SMALLER = 1.0, 0.1
OFFICIAL_THEAD_DEPTH = 3  # blocks in the official T-Head (`transhead.blocks.0-2`)


@dataclass
class TrainConfig:
    """One training run. Field names are the YAML keys and (with `-` for `_`) the CLI flags."""

    preset: str | None = None
    method: str = "mokd"  # mokd | dogo | mcl | dino+dogo | dino+mcl (mokd_train.methods)
    mode: str = "mokd"  # "mokd" | "independent" (each model trained alone with DINO's loss)
    arch1: str = "r50"
    arch2: str = "vit_s"
    img_size: int = 224  # global crop size
    # image size the position grids (ViT backbone, both T-Heads) are built for, resized at every forward for
    # crops of other sizes; None = img_size; 224 = the official code at any crop size; --init-from sets it
    position_size: int | None = None
    patch_size: int | None = None  # ViT patch override (applies to the ViT members only)
    stem: str | None = None  # ResNet stem override (applies to the ResNet members only)
    data: str | None = None  # dataset spec; None = $MOKD_DATA or digits (mokd.core.data)
    output_dir: str | None = None
    epochs: int = 100
    batch_size: int = 256  # global, across all processes
    seed: int = 0
    # objective
    losses: tuple[str, ...] = LOSS_TERMS
    lambda1: float | None = None  # None = 1 for the larger model, 0.1 for the smaller, 1/1 if identical
    lambda2: float | None = None
    out_dim: int = 65536
    mlp_hidden_dim: int = 2048
    mlp_bottleneck_dim: int = 256
    mlp_bn: bool = False  # BatchNorm in the MLP-Head's hidden layers (DINO's use_bn; off in the paper recipe)
    thead_dim: int | None = None
    thead_heads: int | None = None
    thead_depth: int = OFFICIAL_THEAD_DEPTH
    thead_l2norm: bool = False  # L2-normalise the T-Head's pooled tokens before its last layer (not official)
    drop_path: float = 0.1  # ViT students only
    # multi-crop
    n_local: int = 8
    local_size: int = 96
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    # augmentation probabilities; None = the recipe's value (DINO's, or the 32 px variant's for small data)
    flip_p: float | None = None
    jitter_p: float | None = None
    grayscale_p: float | None = None
    global1_blur_p: float | None = None
    global2_blur_p: float | None = None
    local_blur_p: float | None = None
    solarize_p: float | None = None  # second global crop only
    # optimisation: learning rates (peaks and floors) are per 256 images and scaled by batch_size / 256
    cnn_optimizer: str = "sgd"  # sgd (official, momentum 0.9) | adamw (as the ViT; the tiny recipe)
    lr_cnn: float = 0.1
    min_lr_cnn: float = 0.0048
    weight_decay_cnn: float = 1e-4
    lr_vit: float = 3e-4
    min_lr_vit: float = 1e-5
    weight_decay_vit: float = 0.04
    weight_decay_end_vit: float = 0.4
    warmup_epochs: float = 10  # lr warm-up; a fraction of an epoch is allowed (short runs)
    clip_grad: float = 3.0  # per parameter tensor; 0 disables
    freeze_last_layer: int = 1  # epochs during which the heads' last layers get no update
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0  # the EMA momentum's cosine ends here (DINO: 1)
    # teacher temperature: linear warm-up, then constant
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    cnn_self_warmup_teacher_temp_epochs: int = 50  # official code quirk for a CNN's self terms
    paper_temperature: bool = False  # True: every term warms up over warmup_teacher_temp_epochs
    # runtime
    device: str = "auto"
    amp: str = "auto"  # auto = bf16 on CUDA, none on CPU
    num_workers: int | None = None  # None = sized to the machine (mokd_train.resources)
    init_from: str | None = None
    resume: bool = True
    save_every: int = 10
    checkpoint_every_steps: int = 0  # 0 = only at epoch ends
    max_steps: int = 0  # stop after this many optimisation steps in total; 0 = no limit
    log_every: int = 10
    export_official: bool = False
    # watching a run (docs/watching-and-slurm.md)
    tensorboard: bool = False  # scalars under <output_dir>/tensorboard/ (needs the `tensorboard` extra)
    knn_every: int = 0  # online k-NN of both teachers every N epochs and at the end; 0 = off
    knn_data: str | None = None  # labelled data of the online k-NN; None = the training data spec
    curves: bool = True  # draw curves.png/.pdf from log.jsonl at the end of the run
    skip_bad_images: bool = False  # an unreadable image is replaced by the next readable one of the split
    # --- other methods: read only by --method dogo / mcl / dino+dogo / dino+mcl ---
    queue_size: int = 65536  # MCL: keys per queue
    peer_lr: float | None = None  # dogo / mcl lr, not batch-scaled; None = the method's (Adam 3e-4 / SGD 0.03)
    peer_weight_decay: float | None = None  # dogo / mcl; None = the method's (1e-6 / 1e-4)
    lr_milestones: tuple[float, ...] = (0.6, 0.8)  # mcl: lr x0.1 at these fractions of the epochs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# One-line help for the command-line flags (every TrainConfig field is a flag; these say what it means).
FIELD_HELP: dict[str, str] = {
    "method": "mokd, dogo, mcl, or the adaptations dino+dogo and dino+mcl (DINO self-distillation + the peer "
              "method's cross terms)",
    "queue_size": "MCL: keys in each network's queue (a multiple of the batch size)",
    "peer_lr": "dogo/mcl learning rate, not scaled by the batch (default: Adam 3e-4 / SGD 0.03)",
    "peer_weight_decay": "dogo/mcl weight decay (default: 1e-6 / 1e-4)",
    "lr_milestones": "mcl: multiply the lr by 0.1 at these fractions of the epochs (default 120 and 160 of 200)",
    "mode": "mokd (the method's self + cross terms) or independent (each model alone with the method's self term: "
            "DINO, SimCLR or MoCo v1)",
    "arch1": "model 1 backbone: r18 r34 r50 r101 vit_t vit_s vit_b r_tiny vit_mini or a timm name",
    "arch2": "model 2 backbone (same choices as --arch1)",
    "img_size": "global crop size",
    "position_size": "image size the position grids are built for (ViT backbone and both T-Heads), resized at every "
                     "forward for other crop sizes; default: img_size, or the grids stored in --init-from; 224 = "
                     "the official code (14x14 ViT grid) at any crop size",
    "patch_size": "ViT patch size override (ViT members only)",
    "stem": "ResNet stem override: imagenet or cifar (ResNet members only)",
    "data": "dataset spec: imagefolder:PATH, cifar10:PATH, cifar100:PATH, digits, shapes[:N]",
    "output_dir": "where checkpoints, config.json and log.jsonl go (required)",
    "epochs": "training epochs",
    "batch_size": "global batch size across all processes",
    "seed": "seed of model init, data order and augmentation",
    "losses": "enabled terms of sm,st,cm,ct (paper Table 7 ablation)",
    "lambda1": "weight of model 1's cross terms (default: 1 for the larger model, 0.1 for the smaller)",
    "lambda2": "weight of model 2's cross terms",
    "out_dim": "K, output dimension of both heads",
    "momentum_teacher_end": "teacher EMA momentum at the end of its cosine schedule (DINO: 1; equal to "
                            "--momentum-teacher for a constant EMA)",
    "warmup_epochs": "linear lr warm-up in epochs; fractions allowed (0.5 = half an epoch of steps)",
    "n_local": "number of local crops",
    "local_size": "local crop size",
    "global_scale": "RandomResizedCrop scale range of the global crops, e.g. 0.25,1.0",
    "local_scale": "RandomResizedCrop scale range of the local crops, e.g. 0.05,0.25",
    "paper_temperature": "warm the teacher temperature over 30 epochs for every term (paper) instead of 50 for CNN "
                         "self terms (official code)",
    "device": "auto, cpu or cuda",
    "num_workers": "DataLoader workers per process (default: sized to the machine's cores; torch threads take "
                   "the rest unless OMP_NUM_THREADS is set)",
    "cnn_optimizer": "the ResNet's optimizer: sgd (official, momentum 0.9) or adamw (as a ViT's; the tiny recipe, "
                     "where SGD left r_tiny near its initialisation)",
    "mlp_bn": "BatchNorm in the MLP-Head's hidden layers (DINO's use_bn; the tiny recipe's guard against collapse)",
    "thead_l2norm": "L2-normalise the T-Head's pooled tokens before its last layer, as the MLP-Head does (not in "
                    "the official code; on in tiny, where the unnormalised T-Head self term collapsed the ViT)",
    "amp": "auto (bf16 on CUDA, none on CPU), none, bf16 or fp16",
    "init_from": "start all four networks and the centers from an official MOKD or mokd checkpoint",
    "resume": "resume automatically from <output-dir>/checkpoint.pth",
    "save_every": "keep a numbered checkpoint copy every N epochs",
    "checkpoint_every_steps": "also checkpoint every N steps inside an epoch (0: epoch ends only)",
    "max_steps": "stop after N optimisation steps in total (0: no limit)",
    "tensorboard": "write every logged scalar to <output-dir>/tensorboard/ (pip install 'mokd[tensorboard]')",
    "knn_every": "evaluate both teachers' k-NN every N epochs and at the end (0: never); history in knn.json",
    "knn_data": "labelled dataset of the online k-NN (default: the training --data)",
    "curves": "draw <output-dir>/curves.png and .pdf from the log at the end of the run",
    "skip_bad_images": "replace an unreadable image (or a broken link in an image folder) by the next readable one "
                       "of the split, deterministically, instead of failing",
    "export_official": "also write the official MOKD checkpoint layout under <output-dir>/official/ (CNN-ViT pairs)",
}


IMAGENET_RECIPE: dict[str, Any] = {
    "img_size": 224, "local_size": 96, "n_local": 8, "batch_size": 256, "epochs": 100, "out_dim": 65536,
    "global_scale": (0.25, 1.0), "local_scale": (0.05, 0.25),
}
PAPER_PAIRS = {
    "r50-vit_s": ("r50", "vit_s"), "r50-vit_b": ("r50", "vit_b"),
    "r101-vit_s": ("r101", "vit_s"), "r101-vit_b": ("r101", "vit_b"),
    "r50-r34": ("r50", "r34"), "r50-r18": ("r50", "r18"),
    "r101-r34": ("r101", "r34"), "r101-r18": ("r101", "r18"),
    "r50-r50": ("r50", "r50"), "r18-r18": ("r18", "r18"),
    "vit_s-vit_t": ("vit_s", "vit_t"), "vit_s-vit_s": ("vit_s", "vit_s"),
}
# CPU-sized: r_tiny + vit_mini (ViT-T's width, 4 blocks), for `digits`/`shapes` on CPU. The paper's recipe
# collapses in a run this short; each departure below and the measurement behind it: docs/demo.md,
# "Why each setting of the tiny preset".
TINY_PRESET: dict[str, Any] = {
    "arch1": "r_tiny", "arch2": "vit_mini", "patch_size": 4, "img_size": 32, "local_size": 16, "n_local": 2,
    "global_scale": (0.5, 1.0), "local_scale": (0.2, 0.5), "flip_p": 0.0, "solarize_p": 0.0,
    "out_dim": 256, "mlp_hidden_dim": 256, "mlp_bottleneck_dim": 64, "mlp_bn": True,
    "thead_l2norm": True, "thead_depth": 1,
    "cnn_optimizer": "adamw", "lr_cnn": 1.6e-2, "lr_vit": 8e-3, "warmup_epochs": 0.5,
    "momentum_teacher": 0.99, "momentum_teacher_end": 0.99, "freeze_last_layer": 0,
    "warmup_teacher_temp": 0.04, "teacher_temp": 0.02,
    "warmup_teacher_temp_epochs": 8, "cnn_self_warmup_teacher_temp_epochs": 8,
    "data": "digits", "epochs": 8, "batch_size": 32,
    "save_every": 4, "log_every": 5,
}
PRESETS: dict[str, dict[str, Any]] = {
    **{name: {**IMAGENET_RECIPE, "arch1": a1, "arch2": a2} for name, (a1, a2) in PAPER_PAIRS.items()},
    "tiny": TINY_PRESET,
}

# The values each numeric setting accepts (NaN and infinity never). tests/test_hardening_numbers.py fails for a
# numeric setting missing here, so a new one gets a rule.
_PROBABILITY_RULES = {key: FRACTION for key in AUGMENTATION_PROBABILITIES}
NUMBER_RULES: dict[str, Range] = {
    "img_size": POSITIVE, "position_size": POSITIVE, "patch_size": POSITIVE, "epochs": POSITIVE,
    "batch_size": POSITIVE, "seed": NON_NEGATIVE, "lambda1": NON_NEGATIVE, "lambda2": NON_NEGATIVE,
    "out_dim": POSITIVE, "mlp_hidden_dim": POSITIVE, "mlp_bottleneck_dim": POSITIVE, "thead_dim": POSITIVE,
    "thead_heads": POSITIVE, "thead_depth": POSITIVE, "drop_path": FRACTION, "n_local": NON_NEGATIVE,
    "local_size": POSITIVE, **_PROBABILITY_RULES, "lr_cnn": NON_NEGATIVE, "min_lr_cnn": NON_NEGATIVE,
    "weight_decay_cnn": NON_NEGATIVE, "lr_vit": NON_NEGATIVE, "min_lr_vit": NON_NEGATIVE,
    "weight_decay_vit": NON_NEGATIVE, "weight_decay_end_vit": NON_NEGATIVE, "warmup_epochs": NON_NEGATIVE,
    "clip_grad": NON_NEGATIVE, "freeze_last_layer": NON_NEGATIVE, "momentum_teacher": FRACTION,
    "momentum_teacher_end": FRACTION, "warmup_teacher_temp": POSITIVE, "teacher_temp": POSITIVE,
    "warmup_teacher_temp_epochs": NON_NEGATIVE, "cnn_self_warmup_teacher_temp_epochs": NON_NEGATIVE,
    "num_workers": NON_NEGATIVE, "save_every": POSITIVE, "checkpoint_every_steps": NON_NEGATIVE,
    "max_steps": NON_NEGATIVE, "log_every": POSITIVE, "queue_size": POSITIVE, "peer_lr": POSITIVE,
    "peer_weight_decay": NON_NEGATIVE, "knn_every": NON_NEGATIVE,
}

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def resolve_config(preset: str | None, yaml_path: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Combine defaults < preset < YAML < flags (a flag value of None means "not given").

    The YAML may name a preset too; a `preset` argument wins. Lambdas left unset are filled in by the
    default rule and the data spec is canonicalised, so the saved config is fully explicit.
    """
    from_yaml = _read_yaml(Path(yaml_path)) if yaml_path is not None else {}
    given_flags = {key: value for key, value in overrides.items() if value is not None}
    for key in given_flags:
        if key not in _FIELDS:
            raise MokdError(f"unknown training option {key!r}{_suggest(key)}")
    preset = preset if preset is not None else from_yaml.get("preset")
    if preset is not None and preset not in PRESETS:
        raise MokdError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    values: dict[str, Any] = {}
    method = given_flags.get("method", from_yaml.get("method", "mokd"))
    layers = [(PRESETS.get(preset, {}), f"preset {preset}"), (method_defaults(method, preset), f"method {method}"),
              (from_yaml, str(yaml_path)), (given_flags, "the command line")]
    for layer, source in layers:
        for key, value in layer.items():
            values[key] = _coerce(key, value, source)
    values["preset"] = preset
    config = TrainConfig(**values)
    validate(config)
    refuse_unused_settings(config, given={*from_yaml, *given_flags})
    lambda1, lambda2 = resolved_lambdas(config)
    return dataclasses.replace(config, lambda1=lambda1, lambda2=lambda2, data=parse_data_spec(config.data).text)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MokdError(f"--config {path} does not exist: give a YAML file of settings") from None
    except IsADirectoryError:
        raise MokdError(f"--config {path} is a directory: give a YAML file of settings") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise MokdError(f"--config {path} cannot be read ({reason}): give a readable YAML file") from None
    except yaml.YAMLError as error:
        raise MokdError(f"config file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise MokdError(f"config file {path} must be a mapping of setting: value")
    settings = {}
    for raw_key, value in loaded.items():
        key = str(raw_key).replace("-", "_")
        if key not in _FIELDS:
            raise MokdError(f"config file {path}: unknown setting {raw_key!r}{_suggest(key)}")
        settings[key] = value
    return settings


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, list(_FIELDS), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; known settings: {', '.join(_FIELDS)}"


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check `value` against the field's type, converting YAML/CLI spellings (lists, '1e-4', 'a,b')."""
    expected = _TYPES[key]

    def bad(what: str) -> MokdError:
        return MokdError(f"{source}: setting {key!r} must be {what}, got {value!r}")

    args = typing.get_args(expected)
    if type(None) in args:
        if value is None:
            return None
        expected = next(arg for arg in args if arg is not type(None))
        args = typing.get_args(expected)
    if expected is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if expected is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if typing.get_origin(expected) is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise bad("a list")
        if args[-1] is Ellipsis:
            return tuple(_coerce_item(key, item, args[0], bad) for item in items)
        if len(items) != len(args):
            raise bad(f"a list of {len(args)} values")
        return tuple(_coerce_item(key, item, kind, bad) for item, kind in zip(items, args))
    raise AssertionError(f"no coercion for {key}: {expected}")


def _coerce_item(key: str, item: Any, kind: type, bad) -> Any:
    if kind is str:
        if not isinstance(item, str):
            raise bad("a list of names")
        return item.strip()
    try:
        if isinstance(item, bool):
            raise ValueError
        return kind(item)
    except (TypeError, ValueError):
        raise bad("a list of numbers") from None


def validate(config: TrainConfig) -> None:
    """Reject values that cannot train, naming the setting; also resolves both architectures."""
    choices = {"method": METHODS, "mode": MODES, "amp": AMP_MODES, "cnn_optimizer": CNN_OPTIMIZERS}
    for key, allowed in choices.items():
        if getattr(config, key) not in allowed:
            raise MokdError(f"setting {key!r} must be one of {', '.join(allowed)}, got {getattr(config, key)!r}")
    if config.output_dir is None:
        raise MokdError("no output directory: give --output-dir (checkpoints, config.json and log.jsonl go there)")
    unknown = [term for term in config.losses if term not in LOSS_TERMS]
    if unknown or not config.losses or len(set(config.losses)) != len(config.losses):
        raise MokdError(f"setting 'losses' must be distinct names from {', '.join(LOSS_TERMS)}, "
                        f"got {list(config.losses)}")
    if "ct" in config.losses and config.method == "mokd" and config.mode == "mokd" and config.n_local < 1:
        raise MokdError("the cross search term 'ct' needs local crops: set n_local >= 1 or drop 'ct' from losses")
    for key, allowed in NUMBER_RULES.items():
        what = f"setting {key!r}" + (" is a probability:" if key in AUGMENTATION_PROBABILITIES else "")
        check_number(getattr(config, key), what, allowed)
    if config.method == "mokd" and config.export_official and config.thead_l2norm:
        raise MokdError("--export-official writes the official layout, whose T-Head does not normalise its pooled "
                        "tokens: a run with thead_l2norm has no official equivalent; drop one of the two")
    if config.method == "mokd" and config.export_official and config.thead_depth != OFFICIAL_THEAD_DEPTH:
        raise MokdError(f"--export-official writes the official layout, whose T-Heads have {OFFICIAL_THEAD_DEPTH} "
                        f"blocks: a run with thead_depth {config.thead_depth} has no official equivalent; "
                        f"set --thead-depth {OFFICIAL_THEAD_DEPTH} or drop --export-official")
    if config.method != "mokd":
        if config.export_official or config.init_from:
            raise MokdError(f"--export-official and --init-from hold MOKD pairs only, not --method {config.method}")
        if config.method in FAITHFUL_PEERS and config.n_local:
            raise MokdError(f"--method {config.method} trains on two views: set n_local to 0 (its default)")
        if any(not 0.0 <= fraction <= 1.0 for fraction in config.lr_milestones):
            raise MokdError(f"setting 'lr_milestones' takes fractions of the run in [0, 1], got {config.lr_milestones}")
    if config.warmup_epochs > config.epochs:
        raise MokdError(f"warmup_epochs ({config.warmup_epochs}) exceeds epochs ({config.epochs}): lower it")
    for key in ("global_scale", "local_scale"):
        low, high = getattr(config, key)
        if not 0.0 < low <= high <= 1.0:
            raise MokdError(f"setting {key!r} must be (low, high) with 0 < low <= high <= 1, got {(low, high)}")
    require_tensorboard(config.tensorboard)
    if config.knn_data is not None:
        parse_data_spec(config.knn_data)  # a malformed spec fails before any training
    check_output_dir(Path(config.output_dir), option="--output-dir")
    check_num_workers(config.num_workers, option="setting 'num_workers'")
    check_device(config.device, option="setting 'device'")
    for spec in arch_specs(config):
        check_image_size(config.img_size, spec, option="setting 'img_size'")
        check_image_size(config.position_size, spec, option="setting 'position_size'")
        if spec.is_vit:
            check_image_size(config.local_size, spec, option="setting 'local_size'")


# The settings only some methods read (any other method would silently ignore them): setting -> its methods.
_MOKD_RECIPE = frozenset({"mokd", "dino+dogo", "dino+mcl"})  # MOKD's optimisers and lr schedules
SETTING_METHODS: dict[str, frozenset[str]] = {
    "losses": frozenset({"mokd"}), "thead_dim": frozenset({"mokd"}), "thead_heads": frozenset({"mokd"}),
    "thead_depth": frozenset({"mokd"}), "thead_l2norm": frozenset({"mokd"}),
    "queue_size": frozenset({"mcl", "dino+mcl"}), "lr_milestones": frozenset({"mcl"}),
    "peer_lr": FAITHFUL_PEERS, "peer_weight_decay": FAITHFUL_PEERS,
    **{key: _MOKD_RECIPE for key in ("cnn_optimizer", "lr_cnn", "min_lr_cnn", "weight_decay_cnn", "lr_vit",
                                     "min_lr_vit", "weight_decay_vit", "weight_decay_end_vit")},
}
CROSS_TERM_SETTINGS = ("lambda1", "lambda2")  # read only when the two models train together


def refuse_unused_settings(config: TrainConfig, given: set[str]) -> None:
    """A setting given in YAML or on the command line that the chosen method or mode never reads is an error,
    not a silent no-op: the user believes it changed the run."""
    unused = sorted(key for key in given if config.method not in SETTING_METHODS.get(key, METHODS))
    if unused:
        raise MokdError(f"{_flags(unused)} {'does' if len(unused) == 1 else 'do'} not apply to --method "
                        f"{config.method}: drop {'it' if len(unused) == 1 else 'them'}")
    unused = [key for key in CROSS_TERM_SETTINGS if key in given and config.mode == "independent"]
    if unused:
        raise MokdError(f"{_flags(unused)} {'does' if len(unused) == 1 else 'do'} not apply to --mode independent "
                        f"(--method {config.method}): the models train apart, with no cross terms; drop "
                        f"{'it' if len(unused) == 1 else 'them'}")


def _flags(keys: list[str]) -> str:
    return ", ".join("--" + key.replace("_", "-") for key in keys)


def arch_specs(config: TrainConfig) -> tuple[ArchSpec, ArchSpec]:
    """Both backbones, built for `position_size` (else `img_size`): a spec's image size sets its position grids.
    The patch override reaches only the ViT members and the stem override only the ResNet members (so a
    preset's patch size survives swapping its ViT for a ResNet)."""
    names = (config.arch1, config.arch2)
    plain = [resolve_arch(name) for name in names]
    return tuple(
        resolve_arch(name, img_size=config.position_size or config.img_size,
                     patch_size=config.patch_size if spec.is_vit else None,
                     stem=None if spec.is_vit else config.stem)
        for name, spec in zip(names, plain)
    )


def backbone_parameter_count(spec: ArchSpec) -> int:
    """Parameters of the backbone, counted on the meta device (nothing is allocated)."""
    return sum(parameter.numel() for parameter in meta_backbone(spec).parameters())


def resolved_lambdas(config: TrainConfig) -> tuple[float, float]:
    """The configured lambdas, with None replaced by the default rule (paper §4.5)."""
    if config.lambda1 is not None and config.lambda2 is not None:
        return config.lambda1, config.lambda2
    if config.method in DEFAULT_LAMBDAS:
        defaults = DEFAULT_LAMBDAS[config.method]
        return (config.lambda1 if config.lambda1 is not None else defaults[0],
                config.lambda2 if config.lambda2 is not None else defaults[1])
    spec1, spec2 = arch_specs(config)
    if spec1 == dataclasses.replace(spec2, name=spec1.name):
        defaults = (LAMBDA_LARGER, LAMBDA_LARGER)
    else:
        count1, count2 = backbone_parameter_count(spec1), backbone_parameter_count(spec2)
        if count1 == count2:
            defaults = (LAMBDA_LARGER, LAMBDA_LARGER)
        else:
            defaults = (LAMBDA_LARGER, LAMBDA_SMALLER) if count1 > count2 else (LAMBDA_SMALLER, LAMBDA_LARGER)
    return (config.lambda1 if config.lambda1 is not None else defaults[0],
            config.lambda2 if config.lambda2 is not None else defaults[1])


def describe(config: TrainConfig) -> str:
    """The resolved config as a person reads it: the pair first, then every setting."""
    spec1, spec2 = arch_specs(config)
    lambda1, lambda2 = resolved_lambdas(config)
    scale = config.batch_size / 256
    lines = [
        f"mokd-train: {method_label(config.method)}, {config.mode} training"
        + (f" (preset {config.preset})" if config.preset else ""),
        f"  model 1: {spec1.describe()}",
        f"  model 2: {spec2.describe()}",
    ]
    if config.method != "mokd":
        lines.append(f"  method {method_label(config.method)}: cross-term weights lambda1 = {lambda1:g}, "
                     f"lambda2 = {lambda2:g}" + (" (unused: independent)" if config.mode == "independent" else ""))
    elif config.mode == "mokd":
        lines.append(f"  losses: {', '.join(config.losses)}; lambda1 = {lambda1:g}, lambda2 = {lambda2:g}")
    else:
        lines.append("  losses: sm only for each model (DINO); nothing crosses between the models")
    if config.method in FAITHFUL_PEERS:
        lines.append(f"  optimisation: the method's own recipe (peer_lr {config.peer_lr}, peer_weight_decay "
                     f"{config.peer_weight_decay}; None = the method's default)")
    else:
        lines.append(f"  lr: cnn ({config.cnn_optimizer}) {config.lr_cnn * scale:g} -> "
                     f"{config.min_lr_cnn * scale:g}, "
                     f"vit {config.lr_vit * scale:g} -> {config.min_lr_vit * scale:g} "
                     f"(peak -> floor, base x batch {config.batch_size} / 256)")
    lines.append("  settings:")
    lines.extend(f"    {key} = {value!r}" for key, value in config.to_dict().items())
    return "\n".join(lines)

