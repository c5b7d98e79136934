"""`mokd-eval suite`: the whole paper for one checkpoint, step by step, resumable, then `report`.

The steps are a table (`STEPS`): a name, the function that runs the step on the suite's context and returns its
results payload, and the reason it cannot run here (missing data, no pair, no standard ResNet), listed as a skip,
never faked. Each step function calls a command's logic directly, so a renamed or re-signed function fails at
import or in the suite's tests, not as a skip at night. Adding a protocol is one function and one line. A step
whose results JSON exists and was written by the suite with the same checkpoint hash and settings is reused, so an
interrupted overnight run restarts where it stopped. `plan_suite` (`suite --plan`) resolves every step's settings
into the same `protocol` records the runs write, and runs nothing: a researcher checks a night's run before
starting it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mokd.core.checkpoints import file_sha256, read_checkpoint
from mokd.core.distributed import DistContext
from mokd.core.errors import MokdError
from mokd.core.pipeline import FeatureOptions, RunSettings
from mokd.core.results import build_results, write_results
from mokd_analysis.consistency import run_consistency
from mokd_analysis.mad_eval import run_mad
from mokd_analysis.tsne import run_tsne
from mokd_eval.cifar_eval import run_cifar
from mokd_eval.detection.coco_eval import BACKBONES, CocoSettings, run_coco
from mokd_eval.knn_eval import PAPER_KS, PAPER_TEMPERATURE, run_knn
from mokd_eval.linear_eval import run_linear
from mokd_eval.protocols import SCALES, TrainOptions
from mokd_eval.semisup_eval import run_semisup

REPORT_STEP = "report"
# SimCLR's list files (A.3 uses "the same splits of 1% and 10% of ImageNet [...] in [9]"), in --semisup-splits DIR.
SPLIT_FILES = {1: "1percent.txt", 10: "10percent.txt"}


@dataclass
class SuiteContext:
    """What every step may use."""

    checkpoint: Path
    out_dir: Path
    run: RunSettings  # data, model, key, trust, resolution, seed and where progress lines go
    features: FeatureOptions
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

    def settings(self, step: str) -> dict[str, Any]:
        """What must match for a stored result to be reused."""
        run = self.run
        return {"step": step, "checkpoint_sha256": self.sha256, "data": run.data, "model": run.model,
                "key": run.key, "image_size": run.image_size, "seed": run.seed,
                "skip_bad_images": run.skip_bad_images,
                "feature": self.features.kind.describe(), "epochs": self.epochs, "cifar_data": self.cifar_data,
                "coco_data": self.coco_data, "coco_iters": self.coco_iters, "precision": self.features.precision,
                "scale": self.scale, "semisup_splits": str(self.semisup_splits) if self.semisup_splits else None}

    def train_options(self) -> TrainOptions:
        return TrainOptions(epochs=self.epochs, num_workers=self.features.num_workers, seed=self.run.seed,
                            precision=self.features.precision, scale=self.scale)


# --- the steps: each runs one command's logic on the suite's context and returns its results payload -------------

StepFunction = Callable[[SuiteContext], dict[str, Any]]


def knn_step(context: SuiteContext) -> dict[str, Any]:
    return run_knn(context.checkpoint, context.run, ks=PAPER_KS, temperature=PAPER_TEMPERATURE,
                   features=context.features)


def linear_step(context: SuiteContext) -> dict[str, Any]:
    return run_linear(context.checkpoint, context.run, mode="protocol", features=context.features,
                      feature_given=False, options=context.train_options(), out=context.result_path("linear"),
                      context=context.dist)


def semisup_step(percent: int) -> StepFunction:
    """A.3's fine-tuning on SimCLR's list when --semisup-splits gives it, else a seeded stratified subset."""
    def step(context: SuiteContext) -> dict[str, Any]:
        return run_semisup(context.checkpoint, context.run, percent=percent, split_file=context.split_file(percent),
                           mode="finetune", options=context.train_options(),
                           out=context.result_path(f"semisup{percent}"), context=context.dist,
                           device=context.features.device)
    return step


def cifar_step(dataset: str) -> StepFunction:
    """A.4's fine-tuning on the CIFAR pickles of --cifar-data."""
    def step(context: SuiteContext) -> dict[str, Any]:
        return run_cifar(context.checkpoint, dataclasses.replace(context.run, data=context.cifar_data),
                         dataset=dataset, options=context.train_options(), out=context.result_path(dataset),
                         context=context.dist, device=context.features.device)
    return step


def coco_step(context: SuiteContext) -> dict[str, Any]:
    return run_coco(context.checkpoint, coco_settings(context), context.dist, echo=context.run.echo)


def consistency_step(context: SuiteContext) -> dict[str, Any]:
    """The two models of the pair checkpoint, compared."""
    return run_consistency(context.checkpoint, None, context.run, features=context.features)


def tsne_step(context: SuiteContext) -> dict[str, Any]:
    return run_tsne([context.checkpoint], context.run, features=context.features, classes=None,
                    out_stem=context.result_path("tsne").with_suffix(""))


def mad_step(context: SuiteContext) -> dict[str, Any]:
    return run_mad([context.checkpoint], context.run, device=context.features.device,
                   out_stem=context.result_path("mad").with_suffix(""))


# --- why a step cannot run here ----------------------------------------------------------------------------------


def _always_runs(context: SuiteContext) -> str | None:
    return None


def _needs_a_pair(context: SuiteContext) -> str | None:
    """Consistency compares the two models of a pair checkpoint; a single model has nothing to compare."""
    run = context.run
    if run.key is None and len(read_checkpoint(context.checkpoint, trust=run.trust).default_keys) == 2:
        return None
    return "needs a pair checkpoint evaluated without --key (run mokd-eval consistency with a second checkpoint)"


def _needs_cifar(context: SuiteContext) -> str | None:
    return None if context.cifar_data else "needs --cifar-data PATH (the folder of the CIFAR python pickles)"


def _coco_backbone(context: SuiteContext) -> str | None:
    """The detector backbone name (r18/r34/r50/r101) of the checkpoint's ResNet, if it has a standard one."""
    ckpt = read_checkpoint(context.checkpoint, trust=context.run.trust)
    keys = [context.run.key] if context.run.key else ckpt.default_keys
    names = {ckpt.entries[key].spec.name for key in keys if key in ckpt.entries and ckpt.entries[key].spec}
    return next((name for name in BACKBONES if name in names), None)


def _needs_coco(context: SuiteContext) -> str | None:
    if not context.coco_data:
        return "needs --coco-data ROOT (COCO layout, or shapes-coco for a smoke run)"
    if _coco_backbone(context) is None:
        return "no standard ResNet (r18, r34, r50, r101) in the checkpoint: Table 6 transfers ResNets only"
    return None


def coco_settings(context: SuiteContext) -> CocoSettings:
    """The detector transfer of the checkpoint's standard ResNet, its checkpoints under the suite's folder."""
    iters = {"iters": context.coco_iters} if context.coco_iters else {}
    return CocoSettings(backbone=_coco_backbone(context), data=context.coco_data, key=context.run.key,
                        trust=context.run.trust, num_workers=context.features.num_workers, seed=context.run.seed,
                        output_dir=context.out_dir / "coco" / f"{context.checkpoint.stem}-detector", **iters)


@dataclass(frozen=True)
class Step:
    name: str
    run: StepFunction  # returns the results payload
    skip_reason: Callable[[SuiteContext], str | None] = _always_runs


STEPS: tuple[Step, ...] = (
    Step("knn", knn_step),
    Step("linear", linear_step),
    Step("semisup1", semisup_step(1)),
    Step("semisup10", semisup_step(10)),
    Step("cifar10", cifar_step("cifar10"), _needs_cifar),
    Step("cifar100", cifar_step("cifar100"), _needs_cifar),
    Step("coco", coco_step, _needs_coco),
    Step("consistency", consistency_step, _needs_a_pair),
    Step("tsne", tsne_step),
    Step("mad", mad_step),
)
STEP_NAMES = tuple(step.name for step in STEPS) + (REPORT_STEP,)


def parse_skip(text: str | None) -> set[str]:
    names = {part.strip() for part in (text or "").split(",") if part.strip()}
    unknown = names - set(STEP_NAMES)
    if unknown:
        raise MokdError(f"--skip: unknown step(s) {', '.join(sorted(unknown))}; steps are {', '.join(STEP_NAMES)}")
    return names


def reusable(path: Path, settings: dict[str, Any]) -> bool:
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
    reason = step.skip_reason(context)
    if reason is not None:
        return {"step": step.name, "status": "skipped", "reason": reason}
    context.run.echo(f"== {step.name}")
    try:
        payload = step.run(context)
    except MokdError as error:
        return {"step": step.name, "status": "failed", "reason": str(error)}
    payload["suite"] = {"settings": settings}
    write_results(path, payload)
    return {"step": step.name, "status": "done", "results": str(path), "skipped_images": skipped_images(payload)}


def skipped_images(payload: dict[str, Any]) -> int:
    """The unreadable images a step skipped (--skip-bad-images), over its models, as its results record them."""
    return sum(result.get("skipped_images", 0) for result in payload.get("results", []))


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
            report = run_report(context.out_dir, context.out_dir / REPORT_STEP, echo=context.run.echo)
            write_results(context.out_dir / REPORT_STEP / "report.json", report)
            statuses.append({"step": REPORT_STEP, "status": "done", "results": report["report"]["markdown"]})
        except MokdError as error:
            statuses.append({"step": REPORT_STEP, "status": "failed", "reason": str(error)})
    config = {"checkpoint": str(context.checkpoint), "out_dir": str(context.out_dir), "skip": sorted(skip),
              **context.settings("suite")}
    payload = build_results(command="suite", protocol={"name": "suite", "steps": list(STEP_NAMES)}, dataset={},
                            results=[], timings={}, seed=context.run.seed, config=config)
    payload["steps"] = statuses
    return payload


def suite_table(payload: dict[str, Any]) -> str:
    from mokd.core.results import format_table

    rows = [[s["step"], s["status"], (s.get("results") or s.get("reason", "")) + _skipped_text(s)]
            for s in payload["steps"]]
    return format_table(["step", "status", "results / reason"], rows, title=f"suite: {payload['config']['checkpoint']}")


def _skipped_text(status: dict[str, Any]) -> str:
    count = status.get("skipped_images", 0)
    return f" ({count} unreadable images skipped)" if count else ""


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
        run = context.run
        self.loaded = load_models(context.checkpoint, model=run.model, key=run.key, trust=run.trust,
                                  echo=lambda message: None)
        self.resolution = evaluation_resolution(self.loaded, run.image_size)
        self.data = open_eval_data(run.data, image_size=self.resolution.size, skip_bad_images=run.skip_bad_images)
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
        from mokd_eval.splits import read_split_file, stratified_subset

        train, split_path, seed = self.data.train, self.context.split_file(percent), self.context.run.seed
        if split_path is not None:
            names = [train.item_name(index) for index in range(len(train))]
            size = len(read_split_file(split_path, names, percent=percent))
            kind, described = "file", split_source(split_path, file_sha256(split_path), "file", seed)
        else:
            size = len(stratified_subset(train.targets, percent, seed, train.num_classes))
            kind, described = "stratified", f"stratified, seed {seed}"
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
                                          "resized",
                                          cifar_resolution(self.loaded, entry, self.context.run.image_size)))
        return records

    def coco(self) -> list[dict[str, Any]]:
        from mokd_eval.detection.coco_data import open_coco
        from mokd_eval.detection.coco_eval import coco_protocol, resolve_defaults, resolve_engine

        settings = coco_settings(self.context)
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
        reason = step.skip_reason(context)
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
