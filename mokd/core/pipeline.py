"""Steps shared by every evaluation command: open the data, load the models, get their features.

The protocols (k-NN, linear probe, semi-supervised) and the analyses compose these, `load_models` then
`open_data_for`, so that data, checkpoints and features are always handled the same way and recorded the same
way in the results JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mokd.core.checkpoints import CheckpointFile, LoadedBackbone, load_backbones
from mokd.core.data import DataSpec, LabelledDataset, eval_transform, image_side, open_dataset, parse_data_spec
from mokd.core.features import FeatureCache, FeatureKind, FeatureSet, cached_features
from mokd.core.results import StageTimer
from mokd.core.validation import check_image_size


@dataclass
class EvalData:
    spec: DataSpec
    train: LabelledDataset
    val: LabelledDataset
    transform: str
    side: int  # the side of the evaluated images in pixels

    def record(self) -> dict[str, Any]:
        """How the dataset is described in a results JSON."""
        return {"spec": self.spec.text, "train_images": len(self.train), "val_images": len(self.val),
                "num_classes": self.train.num_classes, "transform": self.transform,
                "fingerprint": {"train": self.train.fingerprint, "val": self.val.fingerprint},
                "caveats": self.caveats()}

    def summary(self, *, transform: bool = False) -> str:
        """The `data:` line a protocol prints: images per split, classes and, when asked, the transform."""
        counts = f"{len(self.train)} train / {len(self.val)} val images, {self.train.num_classes} classes"
        return f"data: {self.spec.text} ({counts}{'; ' + self.transform if transform else ''})"

    def caveats(self) -> list[str]:
        """Metrics this data makes trivially perfect or meaningless (a one-class folder scores 100 %)."""
        classes, in_val = self.train.num_classes, len(set(self.val.targets.tolist()))
        notes = []
        if classes <= TOP5:
            which = "top-1 and top-5 are" if classes == 1 else "top-5 is"
            notes.append(f"{self.spec.text} has {classes} class{'es' if classes > 1 else ''}: {which} 100 % by "
                         "construction")
        if in_val == 1 and classes > 1:
            notes.append(f"{self.spec.text}: every val image is of one class, so top-1 measures that class only")
        return notes


TOP5 = 5


def open_eval_data(data: str | None, *, image_size: int | None = None, skip_bad_images: bool = False,
                   echo: Callable[[str], None] = print) -> EvalData:
    """Both splits under the evaluation transform; what the data makes of the metrics is said as a warning."""
    spec = parse_data_spec(data)
    transform, description = eval_transform(spec, image_size)
    train = open_dataset(spec, "train", transform, skip_bad_images=skip_bad_images)
    val = open_dataset(spec, "val", transform, skip_bad_images=skip_bad_images)
    eval_data = EvalData(spec, train, val, description, image_side(spec, image_size))
    for note in eval_data.caveats():
        echo(f"warning: {note}")
    return eval_data


# A.1 / A.2: the paper trains on 224 px global crops and evaluates at 224 px, its training size.
PAPER_TRAIN_CROP = 224


def training_crop(checkpoint: CheckpointFile) -> int | None:
    """The global crop size the checkpoint was trained at, when the file stores it (mokd's training config)."""
    size = (checkpoint.meta.get("config") or {}).get("img_size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def paper_resolution(loaded: LoadedBackbone) -> int:
    """The resolution the paper's protocol evaluates this model at: its training crop size (224 in the paper)."""
    return training_crop(loaded.checkpoint) or PAPER_TRAIN_CROP


@dataclass(frozen=True)
class Resolution:
    """The evaluation resolution a command uses and where it came from."""

    size: int | None  # None: the dataset's default (native for small datasets, 224 for folders)
    source: str

    def describe(self, spec: DataSpec) -> str:
        return f"resolution: {image_side(spec, self.size)} px ({self.source})"


def evaluation_resolution(loaded: list[LoadedBackbone], image_size: int | None) -> Resolution:
    """`--image-size` when given, else the training crop size the checkpoint stores (as the paper evaluates at
    its training size), else the dataset's default. The choice is checked against every architecture."""
    if image_size is not None:
        resolution = Resolution(image_size, "--image-size")
    else:
        crops = {training_crop(entry.checkpoint) for entry in loaded} - {None}
        resolution = (Resolution(crops.pop(), "the checkpoint's training crop size") if len(crops) == 1
                      else Resolution(None, "the dataset's default; the checkpoint stores no training crop size"))
    for entry in loaded:
        check_image_size(resolution.size, entry.spec)
    return resolution


@dataclass(frozen=True)
class RunSettings:
    """What every command's logic is told the same way: which data, which models of the checkpoint (and whether
    to trust its pickle), at what resolution, whether unreadable images are skipped, the seed, and where progress
    lines go. The CLI builds it once from the common options; the suite builds it from its own."""

    data: str | None = None
    model: str | None = None
    key: str | None = None
    trust: bool = False
    image_size: int | None = None
    skip_bad_images: bool = False
    seed: int = 0
    echo: Callable[[str], None] = print


def open_data_for(loaded: list[LoadedBackbone], run: RunSettings, *,
                  data_line: Callable[[EvalData], str] | None = None,
                  check_side: bool = False) -> tuple[EvalData, Resolution]:
    """The evaluation data at the resolution `evaluation_resolution` picks for these models, said on screen
    (`data_line` words the data before the resolution line). `check_side` also refuses a side the dataset's
    default gives that a model cannot take: the protocols that train check it before any work."""
    resolution = evaluation_resolution(loaded, run.image_size)
    eval_data = open_eval_data(run.data, image_size=resolution.size, skip_bad_images=run.skip_bad_images,
                               echo=run.echo)
    if data_line is not None:
        run.echo(data_line(eval_data))
    run.echo(resolution.describe(eval_data.spec))
    if check_side:
        for entry in loaded:
            check_image_size(eval_data.side, entry.spec)
    return eval_data, resolution


@dataclass
class FeatureOptions:
    cache: FeatureCache
    kind: FeatureKind = FeatureKind()
    batch_size: int = 256
    num_workers: int | None = None
    device: str = "auto"
    precision: str = "fp32"  # the paper's; bf16 / fp16 autocast on CUDA when asked


def load_models(checkpoint: str | Path, *, model: str | None, key: str | None, trust: bool,
                echo: Callable[[str], None], image_size: int | None = None) -> list[LoadedBackbone]:
    """Load every requested backbone strictly and say what was loaded; `image_size` (the user's evaluation
    resolution, if given) is checked against each architecture (patch multiple, ResNet stride)."""
    loaded = load_backbones(checkpoint, model=model, key=key, trust=trust, img_size=image_size)
    first = loaded[0].checkpoint
    echo(f"checkpoint: {first.path} ({first.format}, sha256 {first.sha256[:12]})")
    for entry in loaded:
        echo(f"  {entry.report}")
    return loaded


def model_features(loaded: LoadedBackbone, data: EvalData, options: FeatureOptions, timer: StageTimer,
                   echo: Callable[[str], None] = print) -> tuple[FeatureSet, FeatureSet]:
    """Train and val features of one model, from the cache when possible; skipped images are reported."""
    return (split_features(loaded, data, "train", options, timer, echo),
            split_features(loaded, data, "val", options, timer, echo))


def split_features(loaded: LoadedBackbone, data: EvalData, split: str, options: FeatureOptions, timer: StageTimer,
                   echo: Callable[[str], None] = print) -> FeatureSet:
    """Features of one split (for analyses that need only one: no train pass for a val t-SNE)."""
    dataset = data.train if split == "train" else data.val
    identity = {"checkpoint_sha256": loaded.checkpoint.sha256, "model_key": loaded.key,
                "dataset": data.spec.text, "split": split, "fingerprint": dataset.fingerprint,
                "transform": data.transform}
    feature_set = cached_features(loaded.module, loaded.spec, dataset, identity=identity, cache=options.cache,
                                  kind=options.kind, batch_size=options.batch_size,
                                  num_workers=options.num_workers, device=options.device,
                                  precision=options.precision, desc=f"{loaded.key} {split}")
    timer.add("extract" if not feature_set.from_cache else "cache_read", feature_set.seconds)
    if feature_set.skipped:
        echo(f"warning: {loaded.key} {split}: skipped {feature_set.skipped} unreadable images "
             f"(--skip-bad-images); {len(feature_set.labels)} of {len(dataset)} used")
    return feature_set


def model_record(loaded: LoadedBackbone) -> dict[str, Any]:
    """The `results[]` entry fields that identify a model (and how it was trained, for the paper's tables)."""
    checkpoint = loaded.checkpoint
    return {"key": loaded.key, "arch": loaded.spec.name, "arch_spec": loaded.spec.to_dict(),
            "checkpoint": {"path": str(checkpoint.path), "sha256": checkpoint.sha256, "format": checkpoint.format,
                           "epoch": checkpoint.epoch, "training": training_summary(checkpoint, loaded.key)}}


def training_summary(checkpoint: CheckpointFile, key: str) -> dict[str, Any]:
    """Which pair and which training a model comes from: mode (mokd / independent), its net (1 or 2) and both
    architectures for pair checkpoints, and the loss terms and lambdas a mokd checkpoint stores in its config.
    Single-model formats (DINO, MoCo, timm...) are independently trained by definition."""
    meta = checkpoint.meta
    if checkpoint.format == "mokd":
        config = meta.get("config") or {}
        archs = meta.get("archs") or {}
        net = int(key[-1]) if key[-1:] in ("1", "2") else None
        method = meta.get("method", "mokd")  # DoGo / MCL runs say which method; their losses are fixed
        return {"mode": meta.get("mode") or config.get("mode"), "net": net,
                "pair": [archs[index]["name"] for index in ("1", "2") if index in archs],
                "losses": list(config["losses"]) if "losses" in config and method == "mokd" else None,
                "lambda1": config.get("lambda1"), "lambda2": config.get("lambda2"),
                **({"method": method} if method != "mokd" else {})}
    if checkpoint.format == "mokd-official":
        pair = [checkpoint.entries[name].spec.name for name in ("teacher_cnn", "teacher_vit")
                if name in checkpoint.entries]
        return {"mode": "mokd", "net": 1 if key.endswith("cnn") else 2, "pair": pair, "losses": None,
                "lambda1": None, "lambda2": None}
    return {"mode": "independent", "net": None, "pair": None, "losses": None, "lambda1": None, "lambda2": None}
