"""`mokd-train`: one option per training setting, resolved into a config and handed to the trainer (or to SLURM)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from mokd.cli.common import submitted
from mokd.cli.options import HELP_OPTIONS, GuardedCommand, slurm_options


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
        default = f"(default {field.default!r})" if field.default is not dataclasses.MISSING else ""
        help_text = f"{FIELD_HELP[field.name]} {default}" if field.name in FIELD_HELP else default
        if kind is bool:
            option = click.option(f"{flag}/--no-{flag[2:]}", field.name, default=None, help=help_text)
        elif kind in (int, float, str):
            option = click.option(flag, field.name, type=kind, default=None, help=help_text)
        else:  # tuples: comma-separated on the command line
            option = click.option(flag, field.name, type=str, default=None, help=f"comma-separated {help_text}")
        function = option(function)
    return function


@click.command(cls=GuardedCommand, context_settings=HELP_OPTIONS)
@click.option("--preset", default=None, help="A paper pair (r50-vit_s, r50-r18, vit_s-vit_t, ...) or tiny (CPU).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="YAML file of settings (keys = the flag names); flags override it.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for user errors.")
@slurm_options
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
    if submitted(click.get_current_context().params, "mokd_train", on_requeue={"resume": True}):
        return
    summary = train(config)  # prints the resolved config on rank 0
    if summary["rank"] == 0:
        click.echo(f"checkpoint: {summary['checkpoint']}")
        if summary["replaced_images"]:
            click.echo(f"unreadable images replaced (--skip-bad-images): {summary['replaced_images']} samples of "
                       f"this run (per epoch in {summary['output_dir']}/log.jsonl)")
