"""The evaluation commands of `mokd-eval`: knn, linear, semisup, cifar, coco, inspect, export and demo.

Each parses its own options, calls the logic in `mokd_eval` (or `mokd_train` for demo) that returns the
results payload, prints its table and writes the JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from mokd.cli.common import feature_settings, rank_echo, results_path, run_settings, train_settings, write
from mokd.cli.options import (cache_options, checked_size, checked_workers, checkpoint_argument,
                              device_option, feature_options, model_options, out_option, output_dir_option,
                              output_file_option, positive, precision_option, tensorboard_option, training_options,
                              subcommand, trust_option)
from mokd.core.errors import MokdError


@subcommand
@checkpoint_argument
@model_options
@feature_options
@click.option("--k", "ks", default="10,20,100,200", show_default=True, help="Comma-separated neighbour counts.")
@click.option("--temperature", type=float, default=0.07, show_default=True)
@click.option("--fp16-bank", is_flag=True, help="Store the train bank in fp16 (halves memory; last digits may move).")
def knn(checkpoint: Path, ks: str, temperature: float, fp16_bank: bool, **kwargs: Any) -> None:
    """Weighted k-NN classification (DINO protocol): top-1/top-5 for every k, best k starred."""
    from mokd.core.distributed import setup, teardown
    from mokd_eval.knn_eval import knn_table, run_knn

    out = results_path(kwargs["out"], "knn", checkpoint.stem)
    features = feature_settings(kwargs)
    context = setup(kwargs["device"])  # under torchrun, extraction is sharded over the ranks
    try:
        payload = run_knn(checkpoint, run_settings(kwargs, rank_echo(context)), ks=_parse_ks(ks),
                          temperature=temperature, features=features, fp16_bank=fp16_bank)
        if context.is_main:
            click.echo(knn_table(payload))
            write(payload, out)
    finally:
        teardown(context)


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise MokdError(f"--k takes comma-separated whole numbers such as 10,20,100,200, not {text!r}") from None
    if not ks or min(ks) < 1:
        raise MokdError(f"--k needs at least one value >= 1, got {text!r}")
    return ks


@subcommand
@checkpoint_argument
@model_options
@training_options
@click.option("--mode", type=click.Choice(["protocol", "cached"]), default="protocol", show_default=True,
              help="protocol: DINO's recipe on augmented images; cached: a sweep of heads on cached features.")
@cache_options
def linear(checkpoint: Path, mode: str, **kwargs: Any) -> None:
    """Linear probe on the frozen backbone (paper A.2): top-1/top-5, trained head saved as .pt."""
    from mokd_eval.linear_eval import linear_table, run_linear

    ctx = click.get_current_context()
    feature_given = ctx.get_parameter_source("feature") is not click.core.ParameterSource.DEFAULT
    options = train_settings(kwargs)
    features = feature_settings({**kwargs, "batch_size": kwargs["eval_batch_size"]})
    _run_training_command(kwargs, "linear", checkpoint, lambda out, context, echo: run_linear(
        checkpoint, run_settings(kwargs, echo), mode=mode, features=features, feature_given=feature_given,
        options=options, out=out, context=context), linear_table)


@subcommand
@checkpoint_argument
@model_options
@training_options
@click.option("--percent", type=float, required=True, help="Labelled fraction: 1 or 10 (any with --split-file).")
@click.option("--split-file", type=click.Path(path_type=Path), default=None,
              help="SimCLR-style list of labelled training image file names (default: a seeded stratified subset, "
                   "saved next to the results).")
@click.option("--mode", type=click.Choice(["finetune", "linear"]), default="finetune", show_default=True,
              help="finetune: the whole network (paper A.3); linear: a frozen linear probe on the subset.")
def semisup(checkpoint: Path, percent: float, split_file: Path | None, mode: str, **kwargs: Any) -> None:
    """Semi-supervised evaluation on 1% / 10% of the labels (paper A.3)."""
    from mokd_eval.semisup_eval import run_semisup, semisup_table

    options = train_settings(kwargs)
    _run_training_command(kwargs, "semisup", checkpoint, lambda out, context, echo: run_semisup(
        checkpoint, run_settings(kwargs, echo), percent=percent, split_file=split_file, mode=mode, options=options,
        out=out, context=context, device=kwargs["device"]), semisup_table)


@subcommand
@checkpoint_argument
@model_options
@training_options
@click.option("--dataset", type=click.Choice(["cifar10", "cifar100"]), required=True)
@click.option("--augment", type=click.Choice(["resized", "padded"]), default="resized", show_default=True,
              help="resized = RandomResizedCrop + flip (A.4); padded = resize, padded random crop + flip.")
def cifar(checkpoint: Path, dataset: str, augment: str, **kwargs: Any) -> None:
    """Fine-tuning transfer to CIFAR-10/100 (paper A.4); --data is the folder of the python pickles, or
    imagefolder:PATH (train/ and val/ class folders of PNGs)."""
    from mokd_eval.cifar_eval import cifar_table, run_cifar

    options = train_settings(kwargs)
    if not kwargs["data"]:
        raise MokdError(f"--data PATH is required: the folder holding the {dataset} python pickles "
                        "(cifar-10-batches-py / cifar-100-python) or that folder itself, or imagefolder:PATH")
    _run_training_command(kwargs, "cifar", checkpoint, lambda out, context, echo: run_cifar(
        checkpoint, run_settings(kwargs, echo), dataset=dataset, options=options, out=out, context=context,
        device=kwargs["device"], augment=augment), cifar_table)


def _run_training_command(kwargs: dict[str, Any], command: str, checkpoint: Path,
                          run: Callable[..., dict[str, Any]], table: Callable[[dict[str, Any]], str]) -> None:
    """Join torchrun's group (or run alone), run the command, print its table and write its JSON on rank 0."""
    from mokd.core.distributed import setup, teardown
    from mokd.core.results import start_training_run
    from mokd_eval.protocols import run_root

    out = results_path(kwargs["out"], command, checkpoint.stem)
    start_training_run(out, run_root(out), resume=kwargs["resume"], overwrite=kwargs["overwrite"])
    context = setup(kwargs["device"])
    try:
        payload = run(out, context, rank_echo(context))
        if context.is_main:
            click.echo(table(payload))
            write(payload, out)
    finally:
        teardown(context)


@subcommand
@checkpoint_argument
@trust_option
@out_option("Also write the inspection as JSON (default: results/inspect/<name>.json).")
def inspect(checkpoint: Path, trust: bool, out: Path | None) -> None:
    """Show a checkpoint's format, keys, models (inferred architecture), sizes and epoch."""
    from mokd_eval.inspect_eval import inspection_text, run_inspect

    out = results_path(out, "inspect", checkpoint.stem)
    payload = run_inspect(checkpoint, trust=trust)
    click.echo(inspection_text(payload))
    write(payload, out)


@subcommand
@checkpoint_argument
@click.option("--format", "fmt", type=click.Choice(["detectron2", "torchvision", "timm"]), required=True)
@output_file_option("-o", "--output", help_text="File to write.")
@click.option("--key", default=None, help="Which model of a pair checkpoint (default: the file's default model).")
@trust_option
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
@out_option("Results JSON (default: results/export/<checkpoint name>.json).")
def export(checkpoint: Path, fmt: str, output: Path, key: str | None, trust: bool, overwrite: bool,
           out: Path | None) -> None:
    """Write one backbone for detectron2 (MoCo naming), torchvision or timm."""
    from mokd.core.pipeline import RunSettings
    from mokd.core.validation import check_not_overwriting
    from mokd_eval.export import run_export

    check_not_overwriting(output, option="--output", overwrite=overwrite)
    path = results_path(out, "export", checkpoint.stem)
    payload = run_export(checkpoint, RunSettings(key=key, trust=trust, echo=click.echo), fmt=fmt, output=output)
    write(payload, path)


@subcommand
@output_dir_option(Path("demo-output"), "Where checkpoints, logs and results go.")
@click.option("--epochs", type=int, default=None, help="Training epochs per mode (default: the tiny preset's).")
@click.option("--seed", type=int, default=0, show_default=True, help="First seed.")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Number of seeds (seed, seed+1, ...); several print mean +/- std.")
@device_option
@click.option("--methods", default=None,
              help="Compare online-distillation methods instead, e.g. mokd,dogo,mcl (also dino+dogo, dino+mcl): "
                   "each method and its Independent baseline, one table.")
def demo(output_dir: Path, epochs: int | None, seed: int, seeds: int, device: str, methods: str | None) -> None:
    """Train the tiny pair on digits (independent, MOKD), k-NN them and their random init: Table 1 in miniature."""
    from mokd_eval.knn import DEFAULT_KS, DEFAULT_TEMPERATURE
    from mokd_train.demo import run_demo

    if methods is not None:  # the method comparison (mokd_train/compare.py)
        from mokd_train.compare import parse_methods, run_compare_demo

        run_compare_demo(output_dir, parse_methods(methods), epochs=epochs, seed=seed, device=device, ks=DEFAULT_KS,
                         temperature=DEFAULT_TEMPERATURE, echo=click.echo)
        return
    run_demo(output_dir, epochs=epochs, seed=seed, seeds=seeds, device=device, ks=DEFAULT_KS,
             temperature=DEFAULT_TEMPERATURE, echo=click.echo)


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


@subcommand
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
@click.option("--iters", type=int, default=None, callback=positive("--iters"),
              help="Train N iterations instead (steps stay at 2/3 and 8/9).")
@click.option("--batch-size", type=int, default=None, callback=positive("--batch-size"),
              help="Images per iteration, all ranks (default 16; shapes-coco 4).")
@click.option("--lr", type=float, default=0.02, show_default=True, callback=positive("--lr"),
              help="Learning rate per 16 images (scaled linearly).")
@click.option("--warmup-iters", type=int, default=None, callback=positive("--warmup-iters"),
              help="Linear warm-up (default 1000, at most iters/10).")
@click.option("--train-sizes", default=None, callback=_parse_sizes,
              help="Train short side LOW,HIGH, uniform (default 600,800; shapes-coco: its image size).")
@click.option("--test-size", type=int, default=None, callback=checked_size("--test-size"),
              help="Test short side (default 800; shapes-coco: its size).")
@click.option("--max-size", type=int, default=1333, show_default=True, callback=checked_size("--max-size"))
@click.option("--rois-per-image", type=int, default=None, callback=positive("--rois-per-image"),
              help="RoIs sampled per training image (default 512; shapes-coco 32).")
@click.option("--test-proposals", type=int, default=None, callback=positive("--test-proposals"),
              help="RPN proposals kept per test image (default 1000; shapes-coco 50).")
@click.option("--precise-bn-iters", type=click.IntRange(min=0), default=None,
              help="Precise-BN batches before evaluation (default 200, at most iters/10; 0 disables).")
@click.option("--checkpoint-period", type=int, default=5000, show_default=True,
              callback=positive("--checkpoint-period"))
@output_dir_option(None, "Detector checkpoints (default results/coco/<checkpoint name>/<key>).")
@click.option("--resume", is_flag=True, help="Continue from detector_last.pt in the output directory.")
@tensorboard_option()
@click.option("--eval-only", is_flag=True, help="Only evaluate --weights (a detector_final.pt).")
@click.option("--weights", type=click.Path(path_type=Path), default=None)
@click.option("--key", default=None, help="Which model of a pair checkpoint (default: its ResNets).")
@trust_option
@device_option
@click.option("--num-workers", type=int, default=None, callback=checked_workers(),
              help="DataLoader workers (default: sized to the machine).")
@click.option("--seed", type=int, default=0, show_default=True)
@precision_option
@out_option("Results JSON (default: results/coco/<checkpoint name>.json).")
def coco(checkpoint: Path | None, schedule: str, iters: int | None, warmup_iters: int | None, device: str,
         out: Path | None, **kwargs: Any) -> None:
    """C4 Mask R-CNN transfer to COCO (Table 6): AP box and mask, initialised from the checkpoint's ResNet."""
    from mokd.core.distributed import setup, teardown
    from mokd_eval.detection.coco_eval import CocoSettings, coco_table, run_coco
    from mokd_eval.detection.train import default_warmup, schedule_iters

    total = schedule_iters(schedule, iters)
    path = results_path(out, "coco", checkpoint.stem if checkpoint else "scratch")
    settings = CocoSettings(iters=total, warmup_iters=warmup_iters if warmup_iters is not None else default_warmup(total),
                            **kwargs)
    context = setup(device)
    try:
        payload = run_coco(checkpoint, settings, context, echo=rank_echo(context))
        if context.is_main:
            click.echo(coco_table(payload))
            write(payload, path)
    finally:
        teardown(context)


EVAL_COMMANDS = (knn, linear, semisup, cifar, coco, inspect, export, demo)
