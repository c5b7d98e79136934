"""The options the commands share, the callbacks that check them while parsing, and the guarded click classes.

Each option is defined once here so that its name, default, help and check read the same on every command.
User mistakes (`MokdError`) print one line and exit with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

import click

from mokd.core.errors import EXIT_USER_ERROR, MokdError

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}


def _report_user_errors(debug: bool, action: Callable[[], Any]) -> Any:
    try:
        return action()
    except MokdError as error:
        if debug:
            raise
        if error.printed:
            click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


def click_error_line(error: click.ClickException, command_path: str) -> str:
    """Click's own message (it names the option, argument or command) as one line, pointing at the --help of
    the command concerned instead of printing click's multi-line usage block."""
    message = " ".join(error.format_message().split()).rstrip(".")
    context = getattr(error, "ctx", None)
    return f"error: {message} (see `{context.command_path if context else command_path} --help`)"


def _exit_with_click_error(error: click.ClickException, command_path: str) -> NoReturn:
    if isinstance(error, click.exceptions.NoArgsIsHelpError):  # a bare `mokd-eval`: its help is the answer
        error.show()
    else:
        click.echo(click_error_line(error, command_path), err=True)
    sys.exit(EXIT_USER_ERROR)


class OneLineUsageErrors:
    """Mixed into a click command: what click refuses while parsing (a value that is not an integer, an
    unknown option or choice, a missing argument) is one line and exit status 2, like a `MokdError`."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as error:
            path = " ".join(name for name in (parent.command_path if parent else None, info_name) if name)
            _exit_with_click_error(error, path)


class Guarded(OneLineUsageErrors):
    """Mixed into a click command or group: `MokdError` is reported as one line, without traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug")) or os.environ.get("MOKD_DEBUG") == "1"
        try:
            return _report_user_errors(debug, lambda: super(Guarded, self).invoke(ctx))
        except click.ClickException as error:  # a group resolving an unknown subcommand
            _exit_with_click_error(error, ctx.command_path)


class NumberCheckedCommand(OneLineUsageErrors, click.Command):
    """A command whose numeric options are checked for finiteness and range once parsed, before any work."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        from mokd.core.validation import check_numeric_options

        rest = super().parse_args(ctx, args)
        check_numeric_options(ctx.params, {param.name: param.opts[0] for param in self.params if param.opts})
        return rest


class GuardedGroup(Guarded, click.Group):
    """The `mokd-eval` group: its subcommands check their numbers and report user errors in one line."""

    command_class = NumberCheckedCommand


class GuardedCommand(Guarded, click.Command):
    """A single click command (`mokd-train`) reporting user errors like `GuardedGroup` does."""


def subcommand(function: Callable) -> click.Command:
    """A `mokd-eval` subcommand (added to the group in `mokd.cli`): its numbers are checked once parsed."""
    return click.command(cls=NumberCheckedCommand)(function)


def apply(function: Callable, options: list[Callable]) -> Callable:
    """Decorate `function` with `options`, the first one shown first in --help."""
    for option in reversed(options):
        function = option(function)
    return function


def validated(check: Callable[[Any], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback running one of `mokd.core.validation`'s checks while the options are parsed,
    so that a bad value fails in one line before any work starts."""
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        return check(value)
    return callback


def positive(option: str) -> Callable:
    from mokd.core.validation import check_positive

    return validated(lambda value: check_positive(value, option))


def checked_size(option: str) -> Callable:
    from mokd.core.validation import check_image_size

    return validated(lambda value: check_image_size(value, option=option))


def checked_workers() -> Callable:
    from mokd.core.validation import check_num_workers

    return validated(check_num_workers)


def checkpoint_argument(function: Callable) -> Callable:
    return click.argument("checkpoint", type=click.Path(path_type=Path))(function)


trust_option = click.option("--trust-checkpoint", "trust", is_flag=True,
                            help="Allow a checkpoint that needs arbitrary unpickling (runs code from the file).")


def model_options(function: Callable) -> Callable:
    return apply(function, [
        click.option("--model", default=None, help="Architecture (r18 r34 r50 r101 vit_t vit_s vit_b or a timm name); "
                                                   "inferred from the weights when omitted."),
        click.option("--key", default=None, help="Which model of the checkpoint (teacher_cnn, teacher_vit, teacher, "
                                                 "student, teacher1, ...); pair checkpoints evaluate both by default."),
        trust_option,
    ])


def out_option(help_text: str = "Results JSON (default: results/<command>/<checkpoint name>.json).") -> Callable:
    from mokd.core.validation import check_output_file

    return click.option("--out", type=click.Path(path_type=Path), default=None, help=help_text,
                        callback=validated(lambda path: None if path is None else check_output_file(path)))


def output_file_option(*names: str, help_text: str) -> Callable:
    """A required file to write (export's -o/--output), checked while parsing."""
    from mokd.core.validation import check_output_file

    return click.option(*names, type=click.Path(path_type=Path), required=True, help=help_text,
                        callback=validated(lambda path: check_output_file(path, option=names[-1])))


def output_dir_option(default: Path | None, help_text: str) -> Callable:
    from mokd.core.validation import check_output_dir

    return click.option("--output-dir", type=click.Path(path_type=Path), default=default, show_default=True,
                        help=help_text, callback=validated(
                            lambda path: None if path is None else check_output_dir(path, option="--output-dir")))


def out_dir_option(default: Path | None, help_text: str) -> Callable:
    from mokd.core.validation import check_output_dir

    return click.option("-o", "--out-dir", type=click.Path(path_type=Path), default=default, show_default=True,
                        help=help_text, callback=validated(
                            lambda path: None if path is None else check_output_dir(path, option="--out-dir")))


def precision_option(function: Callable) -> Callable:
    from mokd.core.validation import PRECISIONS, check_precision

    return click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
                        callback=validated(check_precision),
                        help="fp32 = the paper's; bf16 / fp16 = CUDA autocast (faster, recorded as off-protocol)."
                        )(function)


def device_option(function: Callable) -> Callable:
    from mokd.core.validation import check_device

    return click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.",
                        callback=validated(check_device))(function)


def tensorboard_option() -> Callable:
    from mokd.core.tensorboard_log import INSTALL_HINT, require_tensorboard

    return click.option("--tensorboard", is_flag=True, callback=validated(require_tensorboard),
                        help=f"Also write the training scalars to <run dir>/tensorboard/ ({INSTALL_HINT}).")


data_option = click.option("--data", default=None, help="Dataset: imagefolder:PATH, cifar10:PATH, cifar100:PATH, "
                                                        "digits, shapes[:N]. Default: $MOKD_DATA, else digits.")


def _data_option_list() -> list[Callable]:
    from mokd.core.validation import check_image_size

    return [
        data_option,
        click.option("--image-size", type=int, default=None, callback=validated(check_image_size),
                     help="Evaluation resolution (default: the protocol's)."),
    ]


def _device_option_list(workers_default: str = "1 per 8 CPUs, 1 to 4; on CUDA CPUs - 1, at most 8") -> list[Callable]:
    return [
        click.option("--num-workers", type=int, default=None, callback=checked_workers(),
                     help=f"DataLoader workers (default: {workers_default})."),
        device_option,
        precision_option,
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
        out_option(),
        click.option("--seed", type=int, default=0, show_default=True),
    ]


def feature_options(function: Callable) -> Callable:
    """Data, extraction and feature-cache options of the commands that work on frozen features."""
    batch = click.option("--batch-size", type=int, default=256, show_default=True, callback=positive("--batch-size"))
    return apply(function, [*_data_option_list(), batch, *_device_option_list(), *_cache_option_list(),
                            *_output_option_list()])


def cache_options(function: Callable) -> Callable:
    """The feature type and feature-cache options alone (for commands with their own batch options)."""
    return apply(function, _cache_option_list())


def training_options(function: Callable) -> Callable:
    """Data and training options of the supervised protocols (linear, semisup, cifar): None = the protocol's."""
    return apply(function, [
        *_data_option_list(),
        click.option("--epochs", type=int, default=None, callback=positive("--epochs"),
                     help="Training epochs (default: the protocol's)."),
        click.option("--lr", default=None, help="Base learning rate per 256 images; a comma list runs a search "
                                                "on a held-out slice of the training data (default: per architecture)."),
        click.option("--batch-size", type=int, default=None, callback=positive("--batch-size"),
                     help="Training batch of one optimizer step (default: the protocol's; clamped to the data)."),
        click.option("--warmup-epochs", type=int, default=None,
                     help="Linear warm-up epochs (default: the protocol's, scaled when --epochs is shorter)."),
        click.option("--accum-steps", type=int, default=None, callback=positive("--accum-steps"),
                     help="Gradient accumulation steps per optimizer step."),
        click.option("--max-batch-per-step", type=int, default=None, callback=positive("--max-batch-per-step"),
                     help="Largest micro-batch per process; accumulation steps follow from it."),
        click.option("--eval-batch-size", type=int, default=256, show_default=True,
                     callback=positive("--eval-batch-size"), help="Batch for evaluation and feature extraction."),
        click.option("--resume", is_flag=True, help="Continue from the per-epoch checkpoints of an earlier run."),
        tensorboard_option(),
        click.option("--overwrite", is_flag=True, help="Discard an earlier run's results and checkpoints at --out."),
        *_device_option_list("min(4, usable CPUs - 1): the main process trains"), *_output_option_list(),
    ])


def image_options(function: Callable) -> Callable:
    """Data and run options of the analyses that look at images directly (no feature cache involved)."""
    from mokd.core.validation import check_image_size

    return apply(function, [
        data_option,
        click.option("--image-size", type=int, default=None, callback=validated(check_image_size),
                     help="Input resolution (default: the protocol's)."),
        click.option("--batch-size", type=int, default=16, show_default=True, callback=positive("--batch-size")),
        device_option,
        click.option("--skip-bad-images", is_flag=True, help="Skip unreadable images instead of failing."),
        out_option("Results JSON (default: results/<command>/<name>.json); figures are written next to it."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the image draw (and random init)."),
    ])


def slurm_options(function: Callable) -> Callable:
    """--slurm and what to ask SLURM for (mokd_train.slurm; docs/watching-and-slurm.md)."""
    return apply(function, [
        click.option("--slurm", is_flag=True, help="Submit to SLURM through submitit (pip install 'mokd[slurm]'), "
                                                   "requeued and resumed on preemption or time-out."),
        click.option("--nodes", type=int, default=1, show_default=True, help="--slurm: nodes."),
        click.option("--gpus-per-node", type=int, default=8, show_default=True,
                     help="--slurm: GPUs per node (one process each; 0 = one CPU process per node)."),
        click.option("--partition", default=None, help="--slurm: partition (default: the cluster's)."),
        click.option("--time", type=float, default=72.0, show_default=True, help="--slurm: hours per job."),
        click.option("--slurm-folder", type=click.Path(path_type=Path), default=Path("slurm-logs"),
                     show_default=True, help="--slurm: where submitit writes job scripts and logs."),
        click.option("--slurm-wait", is_flag=True, help="--slurm: wait for the job to end; a failed job's error is "
                                                        "printed here as one line (exit 2)."),
    ])
