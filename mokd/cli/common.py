"""What every command does around its logic: build the settings objects from the parsed options, find and
check where the results go, write them, hand the run to SLURM, and keep non-zero ranks quiet."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

if TYPE_CHECKING:  # the heavy modules are imported when a command runs, not for --help
    from mokd.core.distributed import DistContext
    from mokd.core.pipeline import FeatureOptions, RunSettings
    from mokd_eval.protocols import TrainOptions


def silent(message: str) -> None:
    """Non-zero ranks print nothing."""


def rank_echo(context: DistContext) -> Callable[[str], None]:
    """Where a rank's progress lines go: the terminal on rank 0, nowhere on the others."""
    return click.echo if context.is_main else silent


def run_settings(params: dict[str, Any], echo: Callable[[str], None] = click.echo) -> RunSettings:
    """The common options (data, model, key, trust, resolution, bad images, seed) as one object."""
    from mokd.core.pipeline import RunSettings

    return RunSettings(data=params["data"], model=params["model"], key=params["key"], trust=params["trust"],
                       image_size=params["image_size"], skip_bad_images=params["skip_bad_images"],
                       seed=params["seed"], echo=echo)


def feature_settings(params: dict[str, Any]) -> FeatureOptions:
    from mokd.core.features import DEFAULT_CACHE_DIR, FeatureCache, FeatureKind
    from mokd.core.pipeline import FeatureOptions
    from mokd.core.validation import check_output_dir

    root = None if params["no_cache"] else check_output_dir(params["cache_dir"] or DEFAULT_CACHE_DIR,
                                                           option="--cache-dir")
    return FeatureOptions(cache=FeatureCache(root, params["cache_dtype"]), kind=FeatureKind.parse(params["feature"]),
                          batch_size=params["batch_size"], num_workers=params["num_workers"], device=params["device"],
                          precision=params["precision"])


def train_settings(params: dict[str, Any]) -> TrainOptions:
    from mokd_eval.protocols import TrainOptions, parse_lrs

    return TrainOptions(epochs=params["epochs"], lrs=parse_lrs(params["lr"]), batch_size=params["batch_size"],
                        warmup_epochs=params["warmup_epochs"], accum_steps=params["accum_steps"],
                        max_batch_per_step=params["max_batch_per_step"], eval_batch_size=params["eval_batch_size"],
                        num_workers=params["num_workers"], resume=params["resume"], seed=params["seed"],
                        precision=params["precision"], tensorboard=params["tensorboard"])


def results_path(out: Path | None, command: str, name: str) -> Path:
    """Where the results JSON will go, checked before any work (an explicit --out is checked while parsing)."""
    from mokd.core.results import default_out_path
    from mokd.core.validation import check_output_file

    return out if out is not None else check_output_file(default_out_path(command, name))


def figure_stem(path: Path) -> Path:
    """Figures are written next to the results JSON, under its name."""
    return path.with_suffix("")


def write(payload: dict[str, Any], path: Path) -> None:
    from mokd.core.results import write_results

    click.echo(f"results: {write_results(path, payload)}")


def refuse_slurm_options_without_slurm(params: dict[str, Any]) -> None:
    """What to ask SLURM for (--nodes, --time, --slurm-wait, ...) means nothing without --slurm: given on the
    command line without it, it is refused rather than ignored."""
    from mokd.core.errors import MokdError
    from mokd_train.slurm import OPTION_NAMES

    if params["slurm"]:
        return
    context = click.get_current_context()
    given = [name for name in OPTION_NAMES
             if context.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise MokdError(f"{flags} {'applies' if len(given) == 1 else 'apply'} to a SLURM submission only: add --slurm, "
                        f"or drop {'it' if len(given) == 1 else 'them'}")


def submitted(params: dict[str, Any], command: str, on_requeue: dict[str, Any] | None = None) -> bool:
    """With --slurm, submit this command (same parameters, --slurm off) as a SLURM job and say so (with
    --slurm-wait, wait for it: its failure is this command's one-line error): True. Without, False (run here)."""
    from mokd_train.slurm import (OPTION_NAMES, RequeueableCommand, describe_job, request_from_options, submit,
                                  wait_for_job)

    refuse_slurm_options_without_slurm(params)
    request = request_from_options({name: params[name] for name in OPTION_NAMES})
    if request is None:
        return False
    job = RequeueableCommand("mokd.cli", command, {**params, "slurm": False, "slurm_wait": False}, on_requeue)
    submission = submit(job, request, name=f"mokd-{command}")
    click.echo(describe_job(submission))
    if params["slurm_wait"]:
        wait_for_job(submission)
        click.echo(f"job {submission.job_id} finished")
    return True
