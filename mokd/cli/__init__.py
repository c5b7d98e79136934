"""Command-line entry points: `mokd-eval` (evaluation suite) and `mokd-train` (MOKD pair trainer).

This file only parses options, calls the evaluation/training logic, prints tables and writes results.
User mistakes (`MokdError`) print one line and exit with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from mokd.core.errors import MokdError

EXIT_USER_ERROR = 2


def _report_user_errors(debug: bool, action: Callable[[], Any]) -> Any:
    try:
        return action()
    except MokdError as error:
        if debug:
            raise
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


class NumberCheckedCommand(click.Command):
    """A command whose numeric options are checked for finiteness and range once parsed, before any work."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        from mokd.core.validation import check_numeric_options

        rest = super().parse_args(ctx, args)
        check_numeric_options(ctx.params, {param.name: param.opts[0] for param in self.params if param.opts})
        return rest


class GuardedGroup(click.Group):
    """A click group whose subcommands report `MokdError` as one line, without traceback."""

    command_class = NumberCheckedCommand

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug")) or os.environ.get("MOKD_DEBUG") == "1"
        return _report_user_errors(debug, lambda: super(GuardedGroup, self).invoke(ctx))


def _checkpoint_argument(function: Callable) -> Callable:
    return click.argument("checkpoint", type=click.Path(path_type=Path))(function)


def _model_options(function: Callable) -> Callable:
    options = [
        click.option("--model", default=None, help="Architecture (r18 r34 r50 r101 vit_t vit_s vit_b or a timm name); "
                                                   "inferred from the weights when omitted."),
        click.option("--key", default=None, help="Which model of the checkpoint (teacher_cnn, teacher_vit, teacher, "
                                                 "student, teacher1, ...); pair checkpoints evaluate both by default."),
        click.option("--trust-checkpoint", "trust", is_flag=True,
                     help="Allow a checkpoint that needs arbitrary unpickling (runs code from the file)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _validated(check: Callable[[Any], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback running one of `mokd.core.validation`'s checks while the options are parsed,
    so that a bad value fails in one line before any work starts."""
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        return check(value)
    return callback


def _out_option(help_text: str = "Results JSON (default: results/<command>/<checkpoint name>.json).") -> Callable:
    from mokd.core.validation import check_output_file

    return click.option("--out", type=click.Path(path_type=Path), default=None, help=help_text,
                        callback=_validated(lambda path: None if path is None else check_output_file(path)))


def _output_dir_option(default: Path | None, help_text: str) -> Callable:
    from mokd.core.validation import check_output_dir

    return click.option("--output-dir", type=click.Path(path_type=Path), default=default, show_default=True,
                        help=help_text, callback=_validated(
                            lambda path: None if path is None else check_output_dir(path, option="--output-dir")))


def _precision_option(function: Callable) -> Callable:
    from mokd.core.validation import PRECISIONS, check_precision

    return click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
                        callback=_validated(check_precision),
                        help="fp32 = the paper's; bf16 / fp16 = CUDA autocast (faster, recorded as off-protocol)."
                        )(function)


def _device_option(function: Callable) -> Callable:
    from mokd.core.validation import check_device

    return click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.",
                        callback=_validated(check_device))(function)


def _apply(function: Callable, options: list[Callable]) -> Callable:
    for option in reversed(options):
        function = option(function)
    return function


def _positive(option: str) -> Callable:
    from mokd.core.validation import check_positive

    return _validated(lambda value: check_positive(value, option))


def _data_option_list() -> list[Callable]:
    from mokd.core.validation import check_image_size

    return [
        click.option("--data", default=None, help="Dataset: imagefolder:PATH, cifar10:PATH, cifar100:PATH, digits, "
                                                  "shapes[:N]. Default: $MOKD_DATA, else digits."),
        click.option("--image-size", type=int, default=None, callback=_validated(check_image_size),
                     help="Evaluation resolution (default: the protocol's)."),
    ]


def _device_option_list(workers_default: str = "1 per 8 CPUs, 1 to 4; on CUDA CPUs - 1, at most 8") -> list[Callable]:
    from mokd.core.validation import check_num_workers

    return [
        click.option("--num-workers", type=int, default=None, callback=_validated(check_num_workers),
                     help=f"DataLoader workers (default: {workers_default})."),
        _device_option,
        _precision_option,
    ]


def _cache_option_list() -> list[Callable]:
    return [
        click.option("--feature", "feature", default="default", show_default=True,
                     help="default (pooled/CLS), patch_mean, last_cls:N or last_cls:N+avgpool."),
        click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                     help="Feature cache (default: $MOKD_CACHE_DIR or ~/.cache/mokd)."),
        click.option("--no-cache", is_flag=True, help="Neither read nor write the feature cache."),
        click.option("--cache-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True),
    ]


def _output_option_list() -> list[Callable]:
    return [
        click.option("--skip-bad-images", is_flag=True, help="Skip unreadable images (counted) instead of failing."),
        _out_option(),
        click.option("--seed", type=int, default=0, show_default=True),
    ]


def _feature_options(function: Callable) -> Callable:
    """Data, extraction and feature-cache options of the commands that work on frozen features."""
    batch = click.option("--batch-size", type=int, default=256, show_default=True, callback=_positive("--batch-size"))
    return _apply(function, [*_data_option_list(), batch, *_device_option_list(), *_cache_option_list(),
                             *_output_option_list()])


def _cache_options(function: Callable) -> Callable:
    """The feature type and feature-cache options alone (for commands with their own batch options)."""
    return _apply(function, _cache_option_list())


def _training_options(function: Callable) -> Callable:
    """Data and training options of the supervised protocols (linear, semisup, cifar): None = the protocol's."""
    return _apply(function, [
        *_data_option_list(),
        click.option("--epochs", type=int, default=None, callback=_positive("--epochs"),
                     help="Training epochs (default: the protocol's)."),
        click.option("--lr", default=None, help="Base learning rate per 256 images; a comma list runs a search "
                                                "on a held-out slice of the training data (default: per architecture)."),
        click.option("--batch-size", type=int, default=None, callback=_positive("--batch-size"),
                     help="Training batch of one optimizer step (default: the protocol's; clamped to the data)."),
        click.option("--warmup-epochs", type=int, default=None,
                     help="Linear warm-up epochs (default: the protocol's, scaled when --epochs is shorter)."),
        click.option("--accum-steps", type=int, default=None, callback=_positive("--accum-steps"),
                     help="Gradient accumulation steps per optimizer step."),
        click.option("--max-batch-per-step", type=int, default=None, callback=_positive("--max-batch-per-step"),
                     help="Largest micro-batch per process; accumulation steps follow from it."),
        click.option("--eval-batch-size", type=int, default=256, show_default=True,
                     callback=_positive("--eval-batch-size"), help="Batch for evaluation and feature extraction."),
        click.option("--resume", is_flag=True, help="Continue from the per-epoch checkpoints of an earlier run."),
        _tensorboard_option(),
        click.option("--overwrite", is_flag=True, help="Discard an earlier run's results and checkpoints at --out."),
        *_device_option_list("min(4, usable CPUs - 1): the main process trains"), *_output_option_list(),
    ])


def _tensorboard_option() -> Callable:
    from mokd.core.tensorboard_log import INSTALL_HINT, require_tensorboard

    return click.option("--tensorboard", is_flag=True, callback=_validated(require_tensorboard),
                        help=f"Also write the training scalars to <run dir>/tensorboard/ ({INSTALL_HINT}).")


def _train_settings(kwargs: dict[str, Any]):
    from mokd_eval.protocols import TrainOptions, parse_lrs

    return TrainOptions(epochs=kwargs["epochs"], lrs=parse_lrs(kwargs["lr"]), batch_size=kwargs["batch_size"],
                        warmup_epochs=kwargs["warmup_epochs"], accum_steps=kwargs["accum_steps"],
                        max_batch_per_step=kwargs["max_batch_per_step"], eval_batch_size=kwargs["eval_batch_size"],
                        num_workers=kwargs["num_workers"], resume=kwargs["resume"], seed=kwargs["seed"],
                        precision=kwargs["precision"], tensorboard=kwargs["tensorboard"])


def _slurm_options(function: Callable) -> Callable:
    """--slurm and what to ask SLURM for (mokd_train.slurm; docs/watching-and-slurm.md)."""
    return _apply(function, [
        click.option("--slurm", is_flag=True, help="Submit to SLURM through submitit (pip install 'mokd[slurm]'), "
                                                   "requeued and resumed on preemption or time-out."),
        click.option("--nodes", type=int, default=1, show_default=True, help="--slurm: nodes."),
        click.option("--gpus-per-node", type=int, default=8, show_default=True,
                     help="--slurm: GPUs per node (one process each; 0 = one CPU process per node)."),
        click.option("--partition", default=None, help="--slurm: partition (default: the cluster's)."),
        click.option("--time", type=float, default=72.0, show_default=True, help="--slurm: hours per job."),
        click.option("--slurm-folder", type=click.Path(path_type=Path), default=Path("slurm-logs"),
                     show_default=True, help="--slurm: where submitit writes job scripts and logs."),
    ])


def _submitted(params: dict[str, Any], command: str, on_requeue: dict[str, Any] | None = None) -> bool:
    """With --slurm, submit this command (same parameters, --slurm off) as a SLURM job and say so: True.
    Without, False (run here)."""
    from mokd_train.slurm import OPTION_NAMES, RequeueableCommand, describe_job, request_from_options, submit

    request = request_from_options({name: params[name] for name in OPTION_NAMES})
    if request is None:
        return False
    job = RequeueableCommand("mokd.cli", command, {**params, "slurm": False}, on_requeue)
    click.echo(describe_job(submit(job, request, name=f"mokd-{command}")))
    return True


def _feature_settings(kwargs: dict[str, Any]):
    from mokd.core.features import DEFAULT_CACHE_DIR, FeatureCache, FeatureKind
    from mokd.core.pipeline import FeatureOptions
    from mokd.core.validation import check_output_dir

    root = None if kwargs["no_cache"] else check_output_dir(kwargs["cache_dir"] or DEFAULT_CACHE_DIR,
                                                           option="--cache-dir")
    return FeatureOptions(cache=FeatureCache(root, kwargs["cache_dtype"]), kind=FeatureKind.parse(kwargs["feature"]),
                          batch_size=kwargs["batch_size"], num_workers=kwargs["num_workers"], device=kwargs["device"],
                          precision=kwargs["precision"])


def _results_path(out: Path | None, command: str, name: str) -> Path:
    """Where the results JSON will go, checked before any work (an explicit --out is checked while parsing)."""
    from mokd.core.results import default_out_path
    from mokd.core.validation import check_output_file

    return out if out is not None else check_output_file(default_out_path(command, name))


def _write(payload: dict[str, Any], path: Path) -> None:
    from mokd.core.results import write_results

    click.echo(f"results: {write_results(path, payload)}")


@click.group(cls=GuardedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show Python tracebacks for user errors.")
@click.version_option(package_name="mokd")
def mokd_eval(debug: bool) -> None:
    """Evaluate self-supervised checkpoints (MOKD, DINO, MoCo, timm) the way the MOKD paper does."""


@mokd_eval.command()
@_checkpoint_argument
@_model_options
@_feature_options
@click.option("--k", "ks", default="10,20,100,200", show_default=True, help="Comma-separated neighbour counts.")
@click.option("--temperature", type=float, default=0.07, show_default=True)
@click.option("--fp16-bank", is_flag=True, help="Store the train bank in fp16 (halves memory; last digits may move).")
def knn(checkpoint: Path, ks: str, temperature: float, fp16_bank: bool, **kwargs: Any) -> None:
    """Weighted k-NN classification (DINO protocol): top-1/top-5 for every k, best k starred."""
    from mokd.core.distributed import setup, teardown
    from mokd_eval.knn_eval import knn_table, run_knn

    out = _results_path(kwargs["out"], "knn", checkpoint.stem)
    features = _feature_settings(kwargs)
    context = setup(kwargs["device"])  # under torchrun, extraction is sharded over the ranks
    try:
        payload = run_knn(checkpoint, data=kwargs["data"], ks=_parse_ks(ks), temperature=temperature,
                          features=features, model=kwargs["model"], key=kwargs["key"],
                          trust=kwargs["trust"], image_size=kwargs["image_size"],
                          skip_bad_images=kwargs["skip_bad_images"], fp16_bank=fp16_bank, seed=kwargs["seed"],
                          echo=click.echo if context.is_main else _silent)
        if context.is_main:
            click.echo(knn_table(payload))
            _write(payload, out)
    finally:
        teardown(context)


def _silent(message: str) -> None:
    """Non-zero ranks print nothing."""


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise MokdError(f"--k takes comma-separated whole numbers such as 10,20,100,200, not {text!r}") from None
    if not ks or min(ks) < 1:
        raise MokdError(f"--k needs at least one value >= 1, got {text!r}")
    return ks


@mokd_eval.command()
@_checkpoint_argument
@_model_options
@_training_options
@click.option("--mode", type=click.Choice(["protocol", "cached"]), default="protocol", show_default=True,
              help="protocol: DINO's recipe on augmented images; cached: a sweep of heads on cached features.")
@_cache_options
def linear(checkpoint: Path, mode: str, **kwargs: Any) -> None:
    """Linear probe on the frozen backbone (paper A.2): top-1/top-5, trained head saved as .pt."""
    from mokd_eval.linear_eval import linear_table, run_linear

    ctx = click.get_current_context()
    feature_given = ctx.get_parameter_source("feature") is not click.core.ParameterSource.DEFAULT
    options = _train_settings(kwargs)
    features = _feature_settings({**kwargs, "batch_size": kwargs["eval_batch_size"]})
    _run_training_command(kwargs, "linear", checkpoint, lambda out, context, echo: run_linear(
        checkpoint, mode=mode, data=kwargs["data"], features=features, feature_given=feature_given, options=options,
        out=out, context=context, model=kwargs["model"], key=kwargs["key"], trust=kwargs["trust"],
        image_size=kwargs["image_size"], skip_bad_images=kwargs["skip_bad_images"], echo=echo), linear_table)


@mokd_eval.command()
@_checkpoint_argument
@_model_options
@_training_options
@click.option("--percent", type=float, required=True, help="Labelled fraction: 1 or 10 (any with --split-file).")
@click.option("--split-file", type=click.Path(path_type=Path), default=None,
              help="SimCLR-style list of labelled training image file names (default: a seeded stratified subset, "
                   "saved next to the results).")
@click.option("--mode", type=click.Choice(["finetune", "linear"]), default="finetune", show_default=True,
              help="finetune: the whole network (paper A.3); linear: a frozen linear probe on the subset.")
def semisup(checkpoint: Path, percent: float, split_file: Path | None, mode: str, **kwargs: Any) -> None:
    """Semi-supervised evaluation on 1% / 10% of the labels (paper A.3)."""
    from mokd_eval.semisup_eval import run_semisup, semisup_table

    options = _train_settings(kwargs)
    _run_training_command(kwargs, "semisup", checkpoint, lambda out, context, echo: run_semisup(
        checkpoint, percent=percent, split_file=split_file, mode=mode, data=kwargs["data"], options=options, out=out,
        context=context, device=kwargs["device"], model=kwargs["model"], key=kwargs["key"], trust=kwargs["trust"],
        image_size=kwargs["image_size"], skip_bad_images=kwargs["skip_bad_images"], echo=echo), semisup_table)


@mokd_eval.command()
@_checkpoint_argument
@_model_options
@_training_options
@click.option("--dataset", type=click.Choice(["cifar10", "cifar100"]), required=True)
@click.option("--augment", type=click.Choice(["resized", "padded"]), default="resized", show_default=True,
              help="resized = RandomResizedCrop + flip (A.4); padded = resize, padded random crop + flip.")
def cifar(checkpoint: Path, dataset: str, augment: str, **kwargs: Any) -> None:
    """Fine-tuning transfer to CIFAR-10/100 (paper A.4); --data is the folder of the python pickles, or
    imagefolder:PATH (train/ and val/ class folders of PNGs)."""
    from mokd_eval.cifar_eval import cifar_table, run_cifar

    options = _train_settings(kwargs)
    if not kwargs["data"]:
        raise MokdError(f"--data PATH is required: the folder holding the {dataset} python pickles "
                        "(cifar-10-batches-py / cifar-100-python) or that folder itself, or imagefolder:PATH")
    options = _train_settings(kwargs)
    _run_training_command(kwargs, "cifar", checkpoint, lambda out, context, echo: run_cifar(
        checkpoint, dataset=dataset, data=kwargs["data"], options=options, out=out, context=context,
        device=kwargs["device"], model=kwargs["model"], key=kwargs["key"], trust=kwargs["trust"],
        image_size=kwargs["image_size"], augment=augment, echo=echo), cifar_table)


def _run_training_command(kwargs: dict[str, Any], command: str, checkpoint: Path,
                          run: Callable[..., dict[str, Any]], table: Callable[[dict[str, Any]], str]) -> None:
    """Join torchrun's group (or run alone), run the command, print its table and write its JSON on rank 0."""
    from mokd.core.distributed import setup, teardown
    from mokd_eval.protocols import run_root
    from mokd.core.results import start_training_run

    out = _results_path(kwargs["out"], command, checkpoint.stem)
    start_training_run(out, run_root(out), resume=kwargs["resume"], overwrite=kwargs["overwrite"])
    context = setup(kwargs["device"])
    try:
        payload = run(out, context, click.echo if context.is_main else _silent)
        if context.is_main:
            click.echo(table(payload))
            _write(payload, out)
    finally:
        teardown(context)


@mokd_eval.command()
@_checkpoint_argument
@click.option("--trust-checkpoint", "trust", is_flag=True,
              help="Allow a checkpoint that needs arbitrary unpickling (runs code from the file).")
@_out_option("Also write the inspection as JSON (default: results/inspect/<name>.json).")
def inspect(checkpoint: Path, trust: bool, out: Path | None) -> None:
    """Show a checkpoint's format, keys, models (inferred architecture), sizes and epoch."""
    from mokd.core.checkpoints import inspect_checkpoint
    from mokd.core.results import build_results

    out = _results_path(out, "inspect", checkpoint.stem)
    report = inspect_checkpoint(checkpoint, trust=trust)
    click.echo(_inspection_text(report))
    models = [{"key": entry["key"], "arch": entry["arch"], "metrics": {}, **entry} for entry in report["models"]]
    payload = build_results(command="inspect", protocol={}, dataset={}, results=models, timings={}, seed=None,
                            config={"checkpoint": str(checkpoint), "inspection": report})
    _write(payload, out)


def _inspection_text(report: dict[str, Any]) -> str:
    lines = [f"file: {report['path']}", f"format: {report['format']}", f"sha256: {report['sha256']}",
             f"epoch: {report.get('epoch')}", f"top-level keys: {', '.join(report['top_level_keys'])}",
             f"default models: {', '.join(report['default_keys'])}"]
    for entry in report["models"]:
        lines.append(f"- {entry['key']}: {entry['describe']}{' (inferred)' if entry['inferred'] else ''}")
        lines.append(f"    backbone {entry['backbone_tensors']} tensors / {entry['backbone_params']:,} params; "
                     f"heads {entry['head_tensors']} tensors / {entry['head_params']:,} params"
                     f" ({', '.join(entry['head_prefixes']) or 'none'})")
    return "\n".join(lines)


@mokd_eval.command()
@_output_dir_option(Path("demo-output"), "Where checkpoints, logs and results go.")
@click.option("--epochs", type=int, default=None, help="Training epochs per mode (default: the tiny preset's).")
@click.option("--seed", type=int, default=0, show_default=True, help="First seed.")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Number of seeds (seed, seed+1, ...); several print mean +/- std.")
@_device_option
@click.option("--methods", default=None,
              help="Compare online-distillation methods instead, e.g. mokd,dogo,mcl (also dino+dogo, dino+mcl): "
                   "each method and its Independent baseline, one table.")
def demo(output_dir: Path, epochs: int | None, seed: int, seeds: int, device: str, methods: str | None) -> None:
    """Train the tiny pair on digits (independent, MOKD), k-NN them and their random init: Table 1 in miniature."""
    from mokd_train.demo import run_demo
    from mokd_eval.knn import DEFAULT_KS, DEFAULT_TEMPERATURE

    if methods is not None:  # issue 10: the method comparison (mokd_train/compare.py)
        from mokd_train.compare import parse_methods, run_compare_demo

        run_compare_demo(output_dir, parse_methods(methods), epochs=epochs, seed=seed, device=device, ks=DEFAULT_KS,
                         temperature=DEFAULT_TEMPERATURE, echo=click.echo)
        return
    run_demo(output_dir, epochs=epochs, seed=seed, seeds=seeds, device=device, ks=DEFAULT_KS,
             temperature=DEFAULT_TEMPERATURE, echo=click.echo)


def _checked_size(option: str) -> Callable:
    from mokd.core.validation import check_image_size

    return _validated(lambda value: check_image_size(value, option=option))


def _parse_sizes(ctx: click.Context, param: click.Parameter, text: str | None) -> tuple[int, int] | None:
    """--train-sizes LOW,HIGH, checked while the options are parsed."""
    from mokd.core.validation import check_image_size

    if text is None:
        return None
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise MokdError(f"--train-sizes takes LOW,HIGH in pixels such as 600,800, not {text!r}") from None
    if low > high:
        raise MokdError(f"--train-sizes {text}: LOW must not exceed HIGH")
    return check_image_size(low, option="--train-sizes"), check_image_size(high, option="--train-sizes")


@mokd_eval.command()
@click.argument("checkpoint", type=click.Path(path_type=Path), required=False)
@click.option("--backbone", required=True, type=click.Choice(["r18", "r34", "r50", "r101"]),
              help="The checkpoint's ResNet (checked against the file). Without CHECKPOINT: random init ('scratch').")
@click.option("--data", required=True, help="COCO root (annotations/instances_{train,val}2017.json, {train,val}2017/) "
                                            "or shapes-coco[:N[:SIZE]] (generated).")
@click.option("--engine", type=click.Choice(["auto", "torchvision", "detectron2"]), default="auto", show_default=True,
              help="auto = detectron2 when importable, else the torchvision rebuild.")
@click.option("--res5-head", type=click.Choice(["d2-bottleneck", "native"]), default="d2-bottleneck",
              show_default=True, help="d2-bottleneck = detectron2's stock head (the paper's, A.5); native = the "
                                      "backbone's own layer4 (every res5 weight loads).")
@click.option("--norm", type=click.Choice(["syncbn", "frozenbn"]), default="syncbn", show_default=True,
              help="syncbn = MoCo's SSL-transfer recipe; frozenbn = stock detectron2 (stem+res2 frozen).")
@click.option("--schedule", type=click.Choice(["1x", "2x"]), default=None,
              help="90k / 180k iterations at 16 images (default: 2x, A.5's and MoCo's COCO transfer).")
@click.option("--iters", type=int, default=None, callback=_positive("--iters"),
              help="Train N iterations instead (steps stay at 2/3 and 8/9).")
@click.option("--batch-size", type=int, default=None, callback=_positive("--batch-size"),
              help="Images per iteration, all ranks (default 16; shapes-coco 4).")
@click.option("--lr", type=float, default=0.02, show_default=True, callback=_positive("--lr"),
              help="Learning rate per 16 images (scaled linearly).")
@click.option("--warmup-iters", type=int, default=None, callback=_positive("--warmup-iters"),
              help="Linear warm-up (default 1000, at most iters/10).")
@click.option("--train-sizes", default=None, callback=_parse_sizes,
              help="Train short side LOW,HIGH, uniform (default 600,800; shapes-coco: its image size).")
@click.option("--test-size", type=int, default=None, callback=_checked_size("--test-size"),
              help="Test short side (default 800; shapes-coco: its size).")
@click.option("--max-size", type=int, default=1333, show_default=True, callback=_checked_size("--max-size"))
@click.option("--rois-per-image", type=int, default=None, callback=_positive("--rois-per-image"),
              help="RoIs sampled per training image (default 512; shapes-coco 32).")
@click.option("--test-proposals", type=int, default=None, callback=_positive("--test-proposals"),
              help="RPN proposals kept per test image (default 1000; shapes-coco 50).")
@click.option("--precise-bn-iters", type=click.IntRange(min=0), default=None,
              help="Precise-BN batches before evaluation (default 200, at most iters/10; 0 disables).")
@click.option("--checkpoint-period", type=int, default=5000, show_default=True,
              callback=_positive("--checkpoint-period"))
@_output_dir_option(None, "Detector checkpoints (default results/coco/<checkpoint name>/<key>).")
@click.option("--resume", is_flag=True, help="Continue from detector_last.pt in the output directory.")
@_tensorboard_option()
@click.option("--eval-only", is_flag=True, help="Only evaluate --weights (a detector_final.pt).")
@click.option("--weights", type=click.Path(path_type=Path), default=None)
@click.option("--key", default=None, help="Which model of a pair checkpoint (default: its ResNets).")
@click.option("--trust-checkpoint", "trust", is_flag=True,
              help="Allow a checkpoint that needs arbitrary unpickling (runs code from the file).")
@_device_option
@click.option("--num-workers", type=int, default=None, callback=_validated(lambda v: _check_workers(v)),
              help="DataLoader workers (default: sized to the machine).")
@click.option("--seed", type=int, default=0, show_default=True)
@_precision_option
@_out_option("Results JSON (default: results/coco/<checkpoint name>.json).")
def coco(checkpoint: Path | None, schedule: str, iters: int | None, warmup_iters: int | None, device: str,
         out: Path | None, **kwargs: Any) -> None:
    """C4 Mask R-CNN transfer to COCO (Table 6): AP box and mask, initialised from the checkpoint's ResNet."""
    from mokd_eval.detection.coco_eval import CocoSettings, coco_table, run_coco
    from mokd_eval.detection.train import default_warmup, schedule_iters
    from mokd.core.distributed import setup, teardown

    total = schedule_iters(schedule, iters)
    path = _results_path(out, "coco", checkpoint.stem if checkpoint else "scratch")
    settings = CocoSettings(iters=total, warmup_iters=warmup_iters if warmup_iters is not None else default_warmup(total),
                            **kwargs)
    context = setup(device)
    try:
        payload = run_coco(checkpoint, settings, context, echo=click.echo if context.is_main else _silent)
        if context.is_main:
            click.echo(coco_table(payload))
            _write(payload, path)
    finally:
        teardown(context)


def _check_workers(value: int | None) -> int | None:
    from mokd.core.validation import check_num_workers

    return check_num_workers(value)


# --- analyses (paper section 4.6) -------------------------------------------------------------------------------


def _image_options(function: Callable) -> Callable:
    """Data and run options of the analyses that look at images directly (no feature cache involved)."""
    from mokd.core.validation import check_image_size, check_positive

    options = [
        click.option("--data", default=None, help="Dataset: imagefolder:PATH, cifar10:PATH, cifar100:PATH, digits, "
                                                  "shapes[:N]. Default: $MOKD_DATA, else digits."),
        click.option("--image-size", type=int, default=None, callback=_validated(check_image_size),
                     help="Input resolution (default: the protocol's)."),
        click.option("--batch-size", type=int, default=16, show_default=True,
                     callback=_validated(lambda value: check_positive(value, "--batch-size"))),
        _device_option,
        click.option("--skip-bad-images", is_flag=True, help="Skip unreadable images instead of failing."),
        _out_option("Results JSON (default: results/<command>/<name>.json); figures are written next to it."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the image draw (and random init)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _out_dir_option(default: Path | None, help_text: str) -> Callable:
    from mokd.core.validation import check_output_dir

    return click.option("-o", "--out-dir", type=click.Path(path_type=Path), default=default, show_default=True,
                        help=help_text, callback=_validated(
                            lambda path: None if path is None else check_output_dir(path, option="--out-dir")))


def _figure_stem(path: Path) -> Path:
    return path.with_suffix("")


@mokd_eval.command()
@_checkpoint_argument
@click.option("--format", "fmt", type=click.Choice(["detectron2", "torchvision", "timm"]), required=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="File to write.",
              callback=_validated(lambda path: _check_file(path, "--output")))
@click.option("--key", default=None, help="Which model of a pair checkpoint (default: the file's default model).")
@click.option("--trust-checkpoint", "trust", is_flag=True,
              help="Allow a checkpoint that needs arbitrary unpickling (runs code from the file).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
@_out_option("Results JSON (default: results/export/<checkpoint name>.json).")
def export(checkpoint: Path, fmt: str, output: Path, key: str | None, trust: bool, overwrite: bool,
           out: Path | None) -> None:
    """Write one backbone for detectron2 (MoCo naming), torchvision or timm."""
    from mokd_eval.export import export_backbone
    from mokd.core.pipeline import load_models, model_record
    from mokd.core.results import build_results
    from mokd.core.validation import check_not_overwriting

    check_not_overwriting(output, option="--output", overwrite=overwrite)
    path = _results_path(out, "export", checkpoint.stem)
    loaded = load_models(checkpoint, model=None, key=key, trust=trust, echo=click.echo)
    if len(loaded) > 1:
        raise MokdError(f"{checkpoint} holds {len(loaded)} models ({', '.join(e.key for e in loaded)}): "
                        "choose one with --key")
    summary = export_backbone(loaded[0], fmt, output)
    click.echo(f"wrote {summary['tensors']} tensors of '{summary['key']}' ({summary['arch']}) to {output}; "
               f"loads into {summary['loads_into']}")
    payload = build_results(command="export", protocol={"format": fmt}, dataset={},
                            results=[{**model_record(loaded[0]), "metrics": {}, "export": summary}], timings={},
                            seed=None, config={"checkpoint": str(checkpoint), "format": fmt, "output": str(output),
                                               "key": key})
    _write(payload, path)


def _check_file(path: Path, option: str) -> Path:
    from mokd.core.validation import check_output_file

    return check_output_file(path, option=option)


@mokd_eval.command()
@_checkpoint_argument
@click.argument("checkpoint_b", required=False, type=click.Path(path_type=Path))
@_model_options
@_feature_options
@click.option("--control", type=click.Path(path_type=Path), default=None,
              help="An independently trained model of similar accuracy that replaces model A (Table 9 control).")
@click.option("--key-b", default=None, help="Model of CHECKPOINT_B (default: its first default model).")
@click.option("--key-control", default=None, help="Model of the --control checkpoint (default: its first).")
@click.option("--k", "k", type=int, default=20, show_default=True, help="Neighbours of the k-NN prediction.")
@click.option("--temperature", type=float, default=0.07, show_default=True)
def consistency(checkpoint: Path, checkpoint_b: Path | None, control: Path | None, key_b: str | None,
                key_control: str | None, k: int, temperature: float, **kwargs: Any) -> None:
    """Prediction consistency of two models (Table 9): agreement, right/wrong split, kappa, per class."""
    from mokd_analysis.consistency import consistency_table, run_consistency
    from mokd.core.validation import check_positive

    check_positive(k, "--k")
    name = checkpoint.stem + (f"_vs_{checkpoint_b.stem}" if checkpoint_b else "")
    out = _results_path(kwargs["out"], "consistency", name)
    payload = run_consistency(checkpoint, checkpoint_b, control=control, data=kwargs["data"],
                              features=_feature_settings(kwargs), keys=(kwargs["key"], key_b, key_control),
                              model=kwargs["model"], trust=kwargs["trust"], image_size=kwargs["image_size"],
                              skip_bad_images=kwargs["skip_bad_images"], k=k, temperature=temperature,
                              seed=kwargs["seed"], echo=click.echo)
    click.echo(consistency_table(payload))
    _write(payload, out)


@mokd_eval.command()
@_checkpoint_argument
@click.argument("more", nargs=-1, type=click.Path(path_type=Path))
@_model_options
@_feature_options
@click.option("--classes", type=int, default=10, show_default=True, help="How many classes to draw (seeded).")
@click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True)
def tsne(checkpoint: Path, more: tuple[Path, ...], classes: int, split: str, **kwargs: Any) -> None:
    """t-SNE of the features of one or more models (Fig. 4/S1): colour = class, marker = model."""
    from mokd_analysis.tsne import run_tsne, tsne_table

    checkpoints = [checkpoint, *more]
    out = _results_path(kwargs["out"], "tsne", "_vs_".join(path.stem for path in checkpoints))
    payload = run_tsne(checkpoints, data=kwargs["data"], features=_feature_settings(kwargs), classes=classes,
                       split=split, model=kwargs["model"], key=kwargs["key"], trust=kwargs["trust"],
                       image_size=kwargs["image_size"], skip_bad_images=kwargs["skip_bad_images"],
                       seed=kwargs["seed"], out_stem=_figure_stem(out), echo=click.echo)
    click.echo(tsne_table(payload))
    _write(payload, out)


@mokd_eval.command()
@click.argument("checkpoints", nargs=-1, type=click.Path(path_type=Path))
@_model_options
@_image_options
@click.option("--images", type=int, default=64, show_default=True, help="Validation images averaged over.")
@click.option("--per-block", is_flag=True, help="ResNets: one value per residual block instead of per stage.")
@click.option("--renormalize", is_flag=True, help="ViTs: rescale the patch part of each attention row to sum 1.")
@click.option("--random-init", "random_control", is_flag=True,
              help="Add the randomly initialised architecture of each model as a control curve.")
def mad(checkpoints: tuple[Path, ...], images: int, per_block: bool, renormalize: bool, random_control: bool,
        **kwargs: Any) -> None:
    """Mean attention distance per layer and head (Fig. 5/S2); no checkpoint = the random-init --model."""
    from mokd_analysis.mad_eval import mad_table, run_mad

    name = "_vs_".join(path.stem for path in checkpoints) or f"random_{kwargs['model']}"
    out = _results_path(kwargs["out"], "mad", name)
    payload = run_mad(list(checkpoints), data=kwargs["data"], model=kwargs["model"], key=kwargs["key"],
                      trust=kwargs["trust"], image_size=kwargs["image_size"], images=images,
                      batch_size=kwargs["batch_size"], device=kwargs["device"], per_block=per_block,
                      renormalize=renormalize, random_control=random_control,
                      skip_bad_images=kwargs["skip_bad_images"], seed=kwargs["seed"], out_stem=_figure_stem(out),
                      echo=click.echo)
    click.echo(mad_table(payload))
    _write(payload, out)


@mokd_eval.command()
@_checkpoint_argument
@_model_options
@_image_options
@click.option("--layer", type=int, default=-1, show_default=True, help="ViT layer, 1-based (-1 = last).")
@click.option("--images", type=int, default=4, show_default=True, help="Validation images shown (grid rows).")
def attention(checkpoint: Path, layer: int, images: int, **kwargs: Any) -> None:
    """Class-token attention maps of any ViT layer, per head, over sample images (a grid figure)."""
    from mokd_analysis.attention_maps import attention_table, run_attention

    out = _results_path(kwargs["out"], "attention", checkpoint.stem)
    payload = run_attention(checkpoint, layer=layer, data=kwargs["data"], model=kwargs["model"], key=kwargs["key"],
                            trust=kwargs["trust"], image_size=kwargs["image_size"], images=images,
                            skip_bad_images=kwargs["skip_bad_images"], seed=kwargs["seed"], device=kwargs["device"],
                            out_stem=_figure_stem(out), echo=click.echo)
    click.echo(attention_table(payload))
    _write(payload, out)


@mokd_eval.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out-stem", type=click.Path(path_type=Path), default=None,
              help="Figure path without extension (default: RUN_DIR/curves for one run, "
                   "results/curves/<run>_vs_<run> for several).")
def curves(run_dirs: tuple[Path, ...], out_stem: Path | None) -> None:
    """Training curves of mokd-train runs (losses, lrs, collapse monitor, online k-NN), overlaid; PNG and PDF."""
    from mokd_analysis.curves import default_stem, draw_curves

    paths = draw_curves(list(run_dirs), out_stem or default_stem(list(run_dirs)))
    click.echo(f"curves: {paths['png']} and {paths['pdf']}")


@mokd_eval.command()
@click.argument("results_dir", type=click.Path(path_type=Path))
@_out_dir_option(Path("report"), "Where report.md, tables/*.{md,tex,csv} and report.json go.")
@click.option("--strict", is_flag=True, help="Fail (exit 2) when a results file is unreadable, truncated or broken.")
def report(results_dir: Path, out_dir: Path, strict: bool) -> None:
    """Gather every results JSON under RESULTS_DIR into the paper's tables (Markdown, LaTeX, CSV) and figures;
    results not run with the paper's protocol are listed under "Off-protocol results"."""
    from mokd_analysis.report import report_summary, run_report

    out = out_dir / "report.json"
    payload = run_report(results_dir, out_dir, strict=strict, echo=click.echo)
    click.echo(report_summary(payload))
    _write(payload, out)


@mokd_eval.command()
@_checkpoint_argument
@_model_options
@_feature_options
@_out_dir_option(None, "Where every step's results JSON goes (default: results/suite/<checkpoint name>).")
@click.option("--skip", default=None, help="Comma-separated steps to leave out: knn, linear, semisup1, semisup10, "
                                           "cifar10, cifar100, coco, consistency, tsne, mad, report.")
@click.option("--epochs", type=int, default=None, callback=_positive("--epochs"),
              help="Epochs of every training protocol (linear, semisup, cifar); default: each protocol's preset.")
@click.option("--cifar-data", default=None, help="Folder of the CIFAR python pickles (the cifar steps need it).")
@click.option("--coco-data", default=None, help="COCO root or shapes-coco[:N] (the coco step needs it).")
@click.option("--coco-iters", type=int, default=None, callback=_positive("--coco-iters"),
              help="Detector training iterations (default: the 2x schedule, 180k, as A.5).")
@click.option("--semisup-splits", type=click.Path(path_type=Path), default=None,
              help="Folder of SimCLR's 1percent.txt / 10percent.txt (A.3); default: seeded stratified subsets.")
@click.option("--scale", type=click.Choice(["paper", "small"]), default="paper", show_default=True,
              help="small: training batches sized to the data (8 steps per epoch; off-protocol where it matters).")
@click.option("--plan", is_flag=True, help="Print every step's resolved protocol and exit without running anything.")
@_slurm_options
def suite(checkpoint: Path, out_dir: Path | None, skip: str | None, epochs: int | None, cifar_data: str | None,
          coco_data: str | None, coco_iters: int | None, semisup_splits: Path | None, scale: str, plan: bool,
          **kwargs: Any) -> None:
    """The whole paper for one checkpoint (pair): every protocol and analysis, resumable, then the report."""
    from mokd_analysis.suite import (SuiteContext, check_suite_options, parse_skip, plan_suite, plan_text, run_suite,
                                suite_table)

    from mokd.core.distributed import setup, teardown
    from mokd.core.validation import check_output_dir, check_output_file

    skipped = parse_skip(skip)
    check_suite_options(scale, semisup_splits)
    directory = out_dir or check_output_dir(Path("results") / "suite" / checkpoint.stem, option="--out-dir")
    out = kwargs["out"] or check_output_file(directory / "suite" / f"{checkpoint.stem}.json")
    if not plan and _submitted(click.get_current_context().params, "suite"):
        return
    features = _feature_settings(kwargs)
    dist = setup(kwargs["device"])
    context = SuiteContext(checkpoint=checkpoint, out_dir=directory, data=kwargs["data"], features=features,
                           model=kwargs["model"], key=kwargs["key"], trust=kwargs["trust"],
                           image_size=kwargs["image_size"], seed=kwargs["seed"], echo=click.echo, dist=dist,
                           epochs=epochs, cifar_data=cifar_data, coco_data=coco_data, coco_iters=coco_iters,
                           semisup_splits=semisup_splits, scale=scale)
    if plan:
        teardown(dist)
        click.echo(plan_text(plan_suite(context, skip=skipped)))
        return
    try:
        payload = run_suite(context, skip=skipped)
    finally:
        teardown(dist)
    click.echo(suite_table(payload))
    _write(payload, out)
    failed = [step["step"] for step in payload["steps"] if step["status"] == "failed"]
    if failed:
        raise MokdError(f"suite: step(s) {', '.join(failed)} failed (reasons above); fix and rerun, finished steps "
                        "are reused")


class GuardedCommand(click.Command):
    """A single click command reporting `MokdError` like `GuardedGroup` does."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug")) or os.environ.get("MOKD_DEBUG") == "1"
        return _report_user_errors(debug, lambda: super(GuardedCommand, self).invoke(ctx))


def _training_setting_options(function: Callable) -> Callable:
    """One `--flag` per TrainConfig field, so every setting can be given on the command line.

    Every option defaults to None ("not given") so that the precedence defaults < preset < YAML < flags holds.
    """
    import dataclasses
    import typing

    from mokd_train.config import FIELD_HELP, TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for field in reversed(dataclasses.fields(TrainConfig)):
        if field.name == "preset":
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        if typing.get_origin(kind) is not tuple:  # Optional[X] -> X; a tuple stays a tuple
            kind = next((arg for arg in typing.get_args(kind) if arg is not type(None)), kind)
        base = kind
        default = f"(default {field.default!r})" if field.default is not dataclasses.MISSING else ""
        help_text = f"{FIELD_HELP[field.name]} {default}" if field.name in FIELD_HELP else default
        if base is bool:
            option = click.option(f"{flag}/--no-{flag[2:]}", field.name, default=None, help=help_text)
        elif base in (int, float, str):
            option = click.option(flag, field.name, type=base, default=None, help=help_text)
        else:  # tuples: comma-separated on the command line
            option = click.option(flag, field.name, type=str, default=None, help=f"comma-separated {help_text}")
        function = option(function)
    return function


@click.command(cls=GuardedCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", default=None, help="A paper pair (r50-vit_s, r50-r18, vit_s-vit_t, ...) or tiny (CPU).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="YAML file of settings (keys = the flag names); flags override it.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for user errors.")
@_slurm_options
@_training_setting_options
def mokd_train(preset: str | None, config_path: Path | None, debug: bool, **settings: Any) -> None:
    """Train a MOKD model pair (or, with --mode independent, its DINO baseline) and write checkpoints.

    --method dogo / mcl trains DoGo or MCL instead (--mode independent: SimCLR / MoCo v1 on each model);
    dino+dogo / dino+mcl are adaptations: DINO self-distillation plus the peer method's cross terms."""
    from mokd_train.config import resolve_config
    from mokd_train.engine import train
    from mokd_train.slurm import OPTION_NAMES, check_slurm_numbers

    check_slurm_numbers(settings)
    for name in OPTION_NAMES:
        settings.pop(name)
    config = resolve_config(preset, config_path, settings)  # checked here, also before a submission
    if _submitted(click.get_current_context().params, "mokd_train", on_requeue={"resume": True}):
        return
    summary = train(config)  # prints the resolved config on rank 0
    if summary["rank"] == 0:
        click.echo(f"checkpoint: {summary['checkpoint']}")


if __name__ == "__main__":  # pragma: no cover
    mokd_eval()
