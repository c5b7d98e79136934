"""Command-line entry points: `mokd-eval` (evaluation suite and analyses) and `mokd-train` (MOKD pair trainer).

The commands live in `eval_commands`, `analysis_commands` and `train_command`, their shared options in `options`;
this module builds the `mokd-eval` group from them. Every command is also an attribute of this module, so that a
SLURM job (`mokd_train.slurm.RequeueableCommand("mokd.cli", name, ...)`) finds it by name.
"""

from __future__ import annotations

import click

from mokd.cli.analysis_commands import (ANALYSIS_COMMANDS, attention, consistency, curves, mad, report, suite,
                                        tsne)
from mokd.cli.eval_commands import EVAL_COMMANDS, cifar, coco, demo, export, inspect, knn, linear, semisup
from mokd.cli.options import HELP_OPTIONS, GuardedGroup
from mokd.cli.train_command import mokd_train

__all__ = ["mokd_eval", "mokd_train", "knn", "linear", "semisup", "cifar", "coco", "inspect", "export", "demo",
           "consistency", "tsne", "mad", "attention", "curves", "report", "suite"]


@click.group(cls=GuardedGroup, context_settings=HELP_OPTIONS)
@click.option("--debug", is_flag=True, help="Show Python tracebacks for user errors.")
@click.version_option(package_name="mokd")
def mokd_eval(debug: bool) -> None:
    """Evaluate self-supervised checkpoints (MOKD, DINO, MoCo, timm) the way the MOKD paper does."""


for _command in (*EVAL_COMMANDS, *ANALYSIS_COMMANDS):
    mokd_eval.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    mokd_eval()
