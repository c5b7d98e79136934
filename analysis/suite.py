"""`mokd-eval suite`: the whole paper for one checkpoint, step by step, resumable, then `report`.

The steps are a table (`STEPS`): a name, the command logic's "module:function", and how the suite's settings
become that function's keyword arguments. Adding a protocol is one line. A step whose module or function does
not exist in this build, or whose logic needs arguments the suite cannot provide, is listed as skipped with
that reason, never faked. A step whose results JSON exists and was written by the suite with the same
checkpoint hash and settings is reused, so an interrupted overnight run restarts where it stopped.
`plan_suite` (`suite --plan`) resolves every step's settings into the same `protocol` records the runs write,
and runs nothing: a researcher checks a night's run before starting it.
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from mokd.core.checkpoints import file_sha256, read_checkpoint
from mokd.core.distributed import DistContext
from mokd.core.errors import MokdError
from mokd.core.pipeline import FeatureOptions
from mokd_eval.protocols import SCALES, TrainOptions
from mokd.core.results import build_results, write_results

REPORT_STEP = "report"
# SimCLR's list files (A.3 uses "the same splits of 1% and 10% of ImageNet [...] in [9]"), in --semisup-splits DIR.
SPLIT_FILES = {1: "1percent.txt", 10: "10percent.txt"}


@dataclass
class SuiteContext:
    """What every step may use."""

    checkpoint: Path
    out_dir: Path
    data: str | None
    features: FeatureOptions
    model: str | None
    key: str | None
    trust: bool
    image_size: int | None
    seed: int
    echo: Callable[[str], None]
    dist: DistContext | None = None  # process placement (torchrun or one process), for the training steps
    epochs: int | None = None  # overrides every training protocol's epochs (a short smoke run)
    cifar_data: str | None = None  # folder of the CIFAR python pickles
    coco_data: str | None = None  # COCO root or shapes-coco[:N]
    coco_iters: int | None = None
    semisup_splits: Path | None = None  # folder of SimCLR's 1percent.txt / 10percent.txt
    scale: str = "paper"  # "small": batches sized to the data (see protocols.SMALL_SCALE_STEPS_PER_EPOCH)
    sha256: str = ""

    def split_file(self, percent: int) -> Path | None:
        return self.semisup_splits / SPLIT_FILES[percent] if self.semisup_splits is not None else None

    def result_path(self, step: str) -> Path:
        return self.out_dir / step / f"{self.checkpoint.stem}.json"

    def common(self, step: str) -> dict[str, Any]:
        """Arguments every command's logic understands under these names (each takes the ones it declares)."""
        return {"checkpoint": self.checkpoint, "data": self.data, "features": self.features, "model": self.model,
                "key": self.key, "trust": self.trust, "image_size": self.image_size, "seed": self.seed,
                "echo": self.echo, "device": self.features.device, "out": self.result_path(step),
                "out_stem": self.result_path(step).with_suffix("")}

    def settings(self, step: str) -> dict[str, Any]:
        """What must match for a stored result to be reused."""
        return {"step": step, "checkpoint_sha256": self.sha256, "data": self.data, "model": self.model,
                "key": self.key, "image_size": self.image_size, "seed": self.seed,
                "feature": self.features.kind.describe(), "epochs": self.epochs, "cifar_data": self.cifar_data,
                "coco_data": self.coco_data, "coco_iters": self.coco_iters, "precision": self.features.precision,
                "scale": self.scale, "semisup_splits": str(self.semisup_splits) if self.semisup_splits else None}

    def train_options(self) -> TrainOptions:
        return TrainOptions(epochs=self.epochs, num_workers=self.features.num_workers, seed=self.seed,
                            precision=self.features.precision, scale=self.scale)


def _checkpoint_list(context: SuiteContext) -> dict[str, Any]:
    """For the logic that takes several checkpoints (t-SNE, MAD)."""
    return {"checkpoints": [context.checkpoint]}


def _consistency_args(context: SuiteContext) -> dict[str, Any]:
    return {"checkpoint_a": context.checkpoint}


def _needs_a_pair(context: SuiteContext) -> str | None:
    """Consistency compares the two models of a pair checkpoint; a single model has nothing to compare."""
    if context.key is None and len(read_checkpoint(context.checkpoint, trust=context.trust).default_keys) == 2:
        return None
    return "needs a pair checkpoint evaluated without --key (run mokd-eval consistency with a second checkpoint)"


def _training(**protocol: Any) -> Callable[[SuiteContext], dict[str, Any]]:
    """Arguments of a supervised protocol (linear, semisup, cifar): its own settings plus the suite's."""
    return lambda context: {**protocol, "options": context.train_options(), "context": context.dist}


def _semisup(percent: int) -> Callable[[SuiteContext], dict[str, Any]]:
    """A.3's fine-tuning on SimCLR's list when --semisup-splits gives it, else a seeded stratified subset."""
    return lambda context: _training(percent=percent, split_file=context.split_file(percent), mode="finetune")(context)


def _needs_cifar(context: SuiteContext) -> str | None:
    return None if context.cifar_data else "needs --cifar-data PATH (the folder of the CIFAR python pickles)"


def _coco_backbone(context: SuiteContext) -> str | None:
    """The detector backbone name (r18/r34/r50/r101) of the checkpoint's ResNet, if it has a standard one."""
    from mokd_eval.detection.coco_eval import BACKBONES

    ckpt = read_checkpoint(context.checkpoint, trust=context.trust)
    keys = [context.key] if context.key else ckpt.default_keys
    names = {ckpt.entries[key].spec.name for key in keys if key in ckpt.entries and ckpt.entries[key].spec}
    return next((name for name in BACKBONES if name in names), None)


def _needs_coco(context: SuiteContext) -> str | None:
    if not context.coco_data:
        return "needs --coco-data ROOT (COCO layout, or shapes-coco for a smoke run)"
    if _coco_backbone(context) is None:
        return "no standard ResNet (r18, r34, r50, r101) in the checkpoint: Table 6 transfers ResNets only"
    return None


def _coco_args(context: SuiteContext) -> dict[str, Any]:
    from mokd_eval.detection.coco_eval import CocoSettings

    iters = {"iters": context.coco_iters} if context.coco_iters else {}
    settings = CocoSettings(backbone=_coco_backbone(context), data=context.coco_data, key=context.key,
                            trust=context.trust, num_workers=context.features.num_workers, seed=context.seed,
                            output_dir=context.out_dir / "coco" / f"{context.checkpoint.stem}-detector", **iters)
    return {"settings": settings, "context": context.dist}


@dataclass(frozen=True)
class Step:
    name: str
    target: str  # "module:function" returning the results payload
    extra: Callable[[SuiteContext], dict[str, Any]] = field(default=lambda context: {})
    skip_reason: Callable[[SuiteContext], str | None] = field(default=lambda context: None)


STEPS: tuple[Step, ...] = (
    Step("knn", "mokd_eval.knn_eval:run_knn", lambda c: {"ks": (10, 20, 100, 200), "temperature": 0.07}),
    Step("linear", "mokd_eval.linear_eval:run_linear", _training(mode="protocol", feature_given=False)),
    Step("semisup1", "mokd_eval.semisup_eval:run_semisup", _semisup(1)),
    Step("semisup10", "mokd_eval.semisup_eval:run_semisup", _semisup(10)),
    Step("cifar10", "mokd_eval.cifar_eval:run_cifar",
         lambda c: {**_training(dataset="cifar10")(c), "data": c.cifar_data}, _needs_cifar),
    Step("cifar100", "mokd_eval.cifar_eval:run_cifar",
         lambda c: {**_training(dataset="cifar100")(c), "data": c.cifar_data}, _needs_cifar),
    Step("coco", "mokd_eval.detection.coco_eval:run_coco", _coco_args, _needs_coco),
    Step("consistency", "mokd_analysis.consistency:run_consistency", _consistency_args, _needs_a_pair),
    Step("tsne", "mokd_analysis.tsne:run_tsne", _checkpoint_list),
    Step("mad", "mokd_analysis.mad_eval:run_mad", _checkpoint_list),
)
STEP_NAMES = tuple(step.name for step in STEPS) + (REPORT_STEP,)


def parse_skip(text: str | None) -> set[str]:
    names = {part.strip() for part in (text or "").split(",") if part.strip()}
    unknown = names - set(STEP_NAMES)
    if unknown:
        raise MokdError(f"--skip: unknown step(s) {', '.join(sorted(unknown))}; steps are {', '.join(STEP_NAMES)}")
    return names


def resolve(step: Step) -> tuple[Callable[..., dict[str, Any]] | None, str | None]:
    """The step's function, or why it is not available in this build."""
    module_name, _, function_name = step.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            return None, f"command not available in this build ({module_name} does not exist)"
        raise
    function = getattr(module, function_name, None)
    if function is None:
        return None, f"command not available in this build ({step.target} does not exist)"
    return function, None


def call_arguments(function: Callable, offered: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The offered arguments the function declares, and its required parameters nobody offered."""
    parameters = inspect.signature(function).parameters
    chosen = {name: value for name, value in offered.items() if name in parameters}
    positional = [p for p in parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional and positional[0].name not in chosen and "checkpoint" in offered:
        chosen[positional[0].name] = offered["checkpoint"]  # the checkpoint is every command's first argument
    missing = [name for name, p in parameters.items()
               if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in chosen]
    return chosen, missing


def reusable(path: Path, settings: dict[str, Any]) -> bool:
    import json

    if not path.is_file():
        return False
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(payload, dict) and (payload.get("suite") or {}).get("settings") == settings


def run_step(step: Step, context: SuiteContext) -> dict[str, Any]:
    """Run or reuse one step; returns its status line for the suite's JSON."""
    path, settings = context.result_path(step.name), context.settings(step.name)
    if reusable(path, settings):
        return {"step": step.name, "status": "reused", "results": str(path)}
    function, reason = resolve(step)
    if function is not None:
        reason = step.skip_reason(context)
    if reason is not None:
        return {"step": step.name, "status": "skipped", "reason": reason}
    arguments, missing = call_arguments(function, {**context.common(step.name), **step.extra(context)})
    if missing:
        return {"step": step.name, "status": "skipped",
                "reason": f"{step.target} needs {', '.join(missing)}, which the suite does not provide yet "
                          "(wire it in analysis/suite.py STEPS)"}
    context.echo(f"== {step.name}")
    try:
        payload = function(**arguments)
    except MokdError as error:
        return {"step": step.name, "status": "failed", "reason": str(error)}
    payload["suite"] = {"settings": settings}
    write_results(path, payload)
    return {"step": step.name, "status": "done", "results": str(path)}


def run_suite(context: SuiteContext, *, skip: set[str], steps: Sequence[Step] = STEPS) -> dict[str, Any]:
    """Every step in order (skipped ones listed with the reason), then the report over `out_dir`."""
    from mokd_analysis.report import run_report

    context.sha256 = file_sha256(context.checkpoint)
    statuses = []
    for step in steps:
        if step.name in skip:
            statuses.append({"step": step.name, "status": "skipped", "reason": "--skip"})
            continue
        statuses.append(run_step(step, context))
    if REPORT_STEP in skip:
        statuses.append({"step": REPORT_STEP, "status": "skipped", "reason": "--skip"})
    else:
        try:
            report = run_report(context.out_dir, context.out_dir / REPORT_STEP, echo=context.echo)
            write_results(context.out_dir / REPORT_STEP / "report.json", report)
            statuses.append({"step": REPORT_STEP, "status": "done", "results": report["report"]["markdown"]})
        except MokdError as error:
            statuses.append({"step": REPORT_STEP, "status": "failed", "reason": str(error)})
    config = {"checkpoint": str(context.checkpoint), "out_dir": str(context.out_dir), "skip": sorted(skip),
              **context.settings("suite")}
    payload = build_results(command="suite", protocol={"name": "suite", "steps": list(STEP_NAMES)}, dataset={},
                            results=[], timings={}, seed=context.seed, config=config)
    payload["steps"] = statuses
    return payload


def suite_table(payload: dict[str, Any]) -> str:
    from mokd.core.results import format_table

    rows = [[s["step"], s["status"], s.get("results") or s.get("reason", "")] for s in payload["steps"]]
    return format_table(["step", "status", "results / reason"], rows, title=f"suite: {payload['config']['checkpoint']}")


# --- suite --plan ------------------------------------------------------------------------------------------------


def check_suite_options(scale: str, semisup_splits: Path | None) -> None:
    """A wrong --scale or an incomplete --semisup-splits folder fails before any step runs."""
    if scale not in SCALES:
        raise MokdError(f"--scale {scale!r}: use one of {', '.join(SCALES)}")
    if semisup_splits is not None:
        missing = [name for name in SPLIT_FILES.values() if not (semisup_splits / name).is_file()]
        if missing:
            raise MokdError(f"--semisup-splits {semisup_splits}: no {', '.join(missing)} there; the folder must hold "
                            f"SimCLR's {' and '.join(SPLIT_FILES.values())}")


class _Planner:
    """Resolves each step's protocol records from the models, the data and the suite's options."""

    def __init__(self, context: SuiteContext) -> None:
        from mokd.core.pipeline import evaluation_resolution, load_models, open_eval_data

        self.context = context
        self.loaded = load_models(context.checkpoint, model=context.model, key=context.key, trust=context.trust,
                                  echo=lambda message: None)
        self.resolution = evaluation_resolution(self.loaded, context.image_size)
        self.data = open_eval_data(context.data, image_size=self.resolution.size)
        self.options = context.train_options()

    def knn(self) -> list[dict[str, Any]]:
        from mokd_eval.knn_eval import PAPER_KS, PAPER_TEMPERATURE, knn_protocol

        return [knn_protocol(entry, ks=PAPER_KS, temperature=PAPER_TEMPERATURE, features=self.context.features,
                             side=self.data.side, resolution=self.resolution, fp16_bank=False)
                for entry in self.loaded]

    def linear(self) -> list[dict[str, Any]]:
        from mokd_eval.linear import protocol_feature
        from mokd_eval.linear_eval import linear_preset, linear_protocol
        from mokd_eval.protocols import resolve_settings, selection_text

        records = []
        for entry in self.loaded:
            preset = linear_preset(entry)
            settings, _ = resolve_settings(preset, self.options, len(self.data.train))
            records.append(linear_protocol(entry, settings, preset.lr, selection_text((preset.lr,), self.options),
                                           protocol_feature(entry.spec), self.data.side, self.resolution))
        return records

    def semisup(self, percent: int) -> list[dict[str, Any]]:
        from mokd.core.features import FeatureKind
        from mokd_eval.protocols import resolve_settings, selection_text
        from mokd_eval.semisup_eval import (EPOCHS_BY_PERCENT, FINETUNE_WARMUP, finetune_preset, semisup_protocol,
                                            split_source)
        from mokd_eval.splits import file_sha256, read_split_file, stratified_subset

        train, split_path = self.data.train, self.context.split_file(percent)
        if split_path is not None:
            names = [train.item_name(index) for index in range(len(train))]
            size = len(read_split_file(split_path, names, percent=percent))
            kind, described = "file", split_source(split_path, file_sha256(split_path), "file", self.context.seed)
        else:
            size = len(stratified_subset(train.targets, percent, self.context.seed, train.num_classes))
            kind, described = "stratified", f"stratified, seed {self.context.seed}"
        records = []
        for entry in self.loaded:
            preset = finetune_preset(entry, EPOCHS_BY_PERCENT[percent], FINETUNE_WARMUP)
            settings, _ = resolve_settings(preset, self.options, size)
            records.append(semisup_protocol(entry, "finetune", settings, preset.lr,
                                            selection_text((preset.lr,), self.options), FeatureKind(), self.data.side,
                                            self.resolution, percent, kind, described))
        return records

    def cifar(self, dataset: str) -> list[dict[str, Any]]:
        from mokd_eval.cifar_eval import (CIFAR_EPOCHS, CIFAR_WARMUP, cifar_protocol, cifar_resolution,
                                          cifar_spec_text)
        from mokd.core.data import open_dataset, parse_data_spec
        from mokd_eval.protocols import Preset, resolve_settings, selection_text
        from mokd_eval.semisup_eval import FINETUNE_BASE_LR, FINETUNE_BATCH

        size = len(open_dataset(parse_data_spec(cifar_spec_text(dataset, self.context.cifar_data)), "train"))
        records = []
        for entry in self.loaded:
            preset = Preset(CIFAR_EPOCHS, FINETUNE_BATCH, CIFAR_WARMUP,
                            FINETUNE_BASE_LR["vit" if entry.spec.is_vit else "resnet"])
            settings, _ = resolve_settings(preset, self.options, size)
            records.append(cifar_protocol(entry, settings, preset.lr, selection_text((preset.lr,), self.options),
                                          "resized", cifar_resolution(self.loaded, entry, self.context.image_size)))
        return records

    def coco(self) -> list[dict[str, Any]]:
        from mokd_eval.detection.coco_data import open_coco
        from mokd_eval.detection.coco_eval import coco_protocol, resolve_defaults, resolve_engine

        settings = _coco_args(self.context)["settings"]
        data = open_coco(settings.data)
        return [coco_protocol(data, resolve_defaults(data, settings), resolve_engine(settings.engine))]

    def analysis(self, step: str) -> list[dict[str, Any]]:
        """Analyses have no paper protocol to equal: their resolution and precision are shown."""
        return [{"command": step, "image_size": self.data.side, "image_size_from": self.resolution.source,
                 "precision": self.context.features.precision}]

    def records(self, step: str) -> list[dict[str, Any]]:
        if step.startswith("semisup"):
            return self.semisup(int(step.removeprefix("semisup")))
        if step.startswith("cifar"):
            return self.cifar(step)
        if step in ("knn", "linear", "coco"):
            return getattr(self, step)()
        return self.analysis(step)


def plan_suite(context: SuiteContext, *, skip: set[str], steps: Sequence[Step] = STEPS) -> list[dict[str, Any]]:
    """Every step with its resolved protocol records (one per model), or why it would be skipped; runs nothing."""
    planner = _Planner(context)
    plan = []
    for step in steps:
        if step.name in skip:
            plan.append({"step": step.name, "status": "skipped", "reason": "--skip"})
            continue
        function, reason = resolve(step)
        reason = reason or step.skip_reason(context)
        if reason is not None:
            plan.append({"step": step.name, "status": "skipped", "reason": reason})
            continue
        records = planner.records(step.name)
        names = [entry.key for entry in planner.loaded] if len(records) == len(planner.loaded) else ["all models"]
        plan.append({"step": step.name, "status": "planned", "protocols": dict(zip(names, records))})
    return plan


def plan_text(plan: list[dict[str, Any]]) -> str:
    """One block per step: its status, then per model whether it is the paper's protocol and every setting."""
    lines = []
    for item in plan:
        if item["status"] != "planned":
            lines.append(f"== {item['step']}: skipped ({item['reason']})")
            continue
        lines.append(f"== {item['step']}")
        for name, record in item["protocols"].items():
            verdict = "" if "paper" not in record else (
                "paper's protocol" if record["paper"] else f"OFF-PROTOCOL ({', '.join(record['differs'])})")
            lines.append(f"  {name}: {verdict}".rstrip())
            settings = {key: value for key, value in record.items() if key not in ("paper", "differs")}
            lines.append(f"    {json.dumps(settings, sort_keys=True)}")
    return "\n".join(lines)
