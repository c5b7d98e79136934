"""`mokd-eval suite`: the whole paper for one checkpoint, step by step, resumable, then `report`.

The steps are a table (`STEPS`): a name, the command logic's "module:function", and how the suite's settings
become that function's keyword arguments. Adding a protocol is one line. A step whose module or function does
not exist in this build, or whose logic needs arguments the suite cannot provide, is listed as skipped with
that reason, never faked. A step whose results JSON exists and was written by the suite with the same
checkpoint hash and settings is reused, so an interrupted overnight run restarts where it stopped.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from mokd_eval.checkpoints import file_sha256, read_checkpoint
from mokd_eval.distributed import DistContext
from mokd_eval.errors import MokdError
from mokd_eval.pipeline import FeatureOptions
from mokd_eval.protocols import TrainOptions
from mokd_eval.results import build_results, write_results

REPORT_STEP = "report"


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
    sha256: str = ""

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
                "coco_data": self.coco_data, "coco_iters": self.coco_iters}

    def train_options(self) -> TrainOptions:
        return TrainOptions(epochs=self.epochs, num_workers=self.features.num_workers, seed=self.seed)


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
    Step("semisup1", "mokd_eval.semisup_eval:run_semisup", _training(percent=1, split_file=None, mode="finetune")),
    Step("semisup10", "mokd_eval.semisup_eval:run_semisup", _training(percent=10, split_file=None, mode="finetune")),
    Step("cifar10", "mokd_eval.cifar_eval:run_cifar",
         lambda c: {**_training(dataset="cifar10")(c), "data": c.cifar_data}, _needs_cifar),
    Step("cifar100", "mokd_eval.cifar_eval:run_cifar",
         lambda c: {**_training(dataset="cifar100")(c), "data": c.cifar_data}, _needs_cifar),
    Step("coco", "mokd_eval.detection.coco_eval:run_coco", _coco_args, _needs_coco),
    Step("consistency", "analysis.consistency:run_consistency", _consistency_args, _needs_a_pair),
    Step("tsne", "analysis.tsne:run_tsne", _checkpoint_list),
    Step("mad", "analysis.mad_eval:run_mad", _checkpoint_list),
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
    from analysis.report import run_report

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
    from mokd_eval.results import format_table

    rows = [[s["step"], s["status"], s.get("results") or s.get("reason", "")] for s in payload["steps"]]
    return format_table(["step", "status", "results / reason"], rows, title=f"suite: {payload['config']['checkpoint']}")
