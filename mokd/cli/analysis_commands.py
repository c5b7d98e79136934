"""The analysis commands of `mokd-eval` (paper section 4.6 and the tables): consistency, tsne, mad, attention,
curves, report and suite. Each calls the logic in `mokd_analysis` that returns the payload, prints its table and
writes the JSON (figures go next to it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mokd.cli.common import feature_settings, figure_stem, results_path, run_settings, submitted, write
from mokd.cli.options import (checkpoint_argument, feature_options, image_options, model_options, out_dir_option,
                              positive, slurm_options, subcommand)
from mokd.core.errors import MokdError


@subcommand
@checkpoint_argument
@click.argument("checkpoint_b", required=False, type=click.Path(path_type=Path))
@model_options
@feature_options
@click.option("--control", type=click.Path(path_type=Path), default=None,
              help="An independently trained model of similar accuracy that replaces model A (Table 9 control).")
@click.option("--key-b", default=None, help="Model of CHECKPOINT_B (default: its first default model).")
@click.option("--key-control", default=None, help="Model of the --control checkpoint (default: its first).")
@click.option("--k", "k", type=int, default=20, show_default=True, help="Neighbours of the k-NN prediction.")
@click.option("--temperature", type=float, default=0.07, show_default=True)
def consistency(checkpoint: Path, checkpoint_b: Path | None, control: Path | None, key_b: str | None,
                key_control: str | None, k: int, temperature: float, **kwargs: Any) -> None:
    """Prediction consistency of two models (Table 9): agreement, right/wrong split, kappa, per class."""
    from mokd.core.validation import check_positive
    from mokd_analysis.consistency import consistency_table, run_consistency

    check_positive(k, "--k")
    name = checkpoint.stem + (f"_vs_{checkpoint_b.stem}" if checkpoint_b else "")
    out = results_path(kwargs["out"], "consistency", name)
    payload = run_consistency(checkpoint, checkpoint_b, run_settings(kwargs), control=control,
                              features=feature_settings(kwargs), key_b=key_b, key_control=key_control, k=k,
                              temperature=temperature)
    click.echo(consistency_table(payload))
    write(payload, out)


@subcommand
@checkpoint_argument
@click.argument("more", nargs=-1, type=click.Path(path_type=Path))
@model_options
@feature_options
@click.option("--classes", type=int, default=10, show_default=True, help="How many classes to draw (seeded).")
@click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True)
def tsne(checkpoint: Path, more: tuple[Path, ...], classes: int, split: str, **kwargs: Any) -> None:
    """t-SNE of the features of one or more models (Fig. 4/S1): colour = class, marker = model."""
    from mokd_analysis.tsne import run_tsne, tsne_table

    checkpoints = [checkpoint, *more]
    out = results_path(kwargs["out"], "tsne", "_vs_".join(path.stem for path in checkpoints))
    payload = run_tsne(checkpoints, run_settings(kwargs), features=feature_settings(kwargs), classes=classes,
                       split=split, out_stem=figure_stem(out))
    click.echo(tsne_table(payload))
    write(payload, out)


@subcommand
@click.argument("checkpoints", nargs=-1, type=click.Path(path_type=Path))
@model_options
@image_options
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
    out = results_path(kwargs["out"], "mad", name)
    payload = run_mad(list(checkpoints), run_settings(kwargs), images=images, batch_size=kwargs["batch_size"],
                      device=kwargs["device"], per_block=per_block, renormalize=renormalize,
                      random_control=random_control, out_stem=figure_stem(out))
    click.echo(mad_table(payload))
    write(payload, out)


@subcommand
@checkpoint_argument
@model_options
@image_options
@click.option("--layer", type=int, default=-1, show_default=True, help="ViT layer, 1-based (-1 = last).")
@click.option("--images", type=int, default=4, show_default=True, help="Validation images shown (grid rows).")
def attention(checkpoint: Path, layer: int, images: int, **kwargs: Any) -> None:
    """Class-token attention maps of any ViT layer, per head, over sample images (a grid figure)."""
    from mokd_analysis.attention_maps import attention_table, run_attention

    out = results_path(kwargs["out"], "attention", checkpoint.stem)
    payload = run_attention(checkpoint, run_settings(kwargs), layer=layer, images=images, device=kwargs["device"],
                            out_stem=figure_stem(out))
    click.echo(attention_table(payload))
    write(payload, out)


@subcommand
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out-stem", type=click.Path(path_type=Path), default=None,
              help="Figure path without extension (default: RUN_DIR/curves for one run, "
                   "results/curves/<run>_vs_<run> for several).")
def curves(run_dirs: tuple[Path, ...], out_stem: Path | None) -> None:
    """Training curves of mokd-train runs (losses, lrs, collapse monitor, online k-NN), overlaid; PNG and PDF."""
    from mokd_analysis.curves import default_stem, draw_curves

    paths = draw_curves(list(run_dirs), out_stem or default_stem(list(run_dirs)))
    click.echo(f"curves: {paths['png']} and {paths['pdf']}")


@subcommand
@click.argument("results_dir", type=click.Path(path_type=Path))
@out_dir_option(Path("report"), "Where report.md, tables/*.{md,tex,csv} and report.json go.")
@click.option("--strict", is_flag=True, help="Fail (exit 2) when a results file is unreadable, truncated or broken.")
def report(results_dir: Path, out_dir: Path, strict: bool) -> None:
    """Gather every results JSON under RESULTS_DIR into the paper's tables (Markdown, LaTeX, CSV) and figures;
    results not run with the paper's protocol are listed under "Off-protocol results"."""
    from mokd_analysis.report import report_summary, run_report

    out = out_dir / "report.json"
    payload = run_report(results_dir, out_dir, strict=strict, echo=click.echo)
    click.echo(report_summary(payload))
    write(payload, out)


@subcommand
@checkpoint_argument
@model_options
@feature_options
@out_dir_option(None, "Where every step's results JSON goes (default: results/suite/<checkpoint name>).")
@click.option("--skip", default=None, help="Comma-separated steps to leave out: knn, linear, semisup1, semisup10, "
                                           "cifar10, cifar100, coco, consistency, tsne, mad, report.")
@click.option("--epochs", type=int, default=None, callback=positive("--epochs"),
              help="Epochs of every training protocol (linear, semisup, cifar); default: each protocol's preset.")
@click.option("--cifar-data", default=None, help="Folder of the CIFAR python pickles (the cifar steps need it).")
@click.option("--coco-data", default=None, help="COCO root or shapes-coco[:N] (the coco step needs it).")
@click.option("--coco-iters", type=int, default=None, callback=positive("--coco-iters"),
              help="Detector training iterations (default: the 2x schedule, 180k, as A.5).")
@click.option("--semisup-splits", type=click.Path(path_type=Path), default=None,
              help="Folder of SimCLR's 1percent.txt / 10percent.txt (A.3); default: seeded stratified subsets.")
@click.option("--scale", type=click.Choice(["paper", "small"]), default="paper", show_default=True,
              help="small: training batches sized to the data (8 steps per epoch; off-protocol where it matters).")
@click.option("--plan", is_flag=True, help="Print every step's resolved protocol and exit without running anything.")
@slurm_options
def suite(checkpoint: Path, out_dir: Path | None, skip: str | None, epochs: int | None, cifar_data: str | None,
          coco_data: str | None, coco_iters: int | None, semisup_splits: Path | None, scale: str, plan: bool,
          **kwargs: Any) -> None:
    """The whole paper for one checkpoint (pair): every protocol and analysis, resumable, then the report."""
    from mokd.core.distributed import setup, teardown
    from mokd.core.validation import check_output_dir, check_output_file
    from mokd_analysis.suite import (SuiteContext, check_suite_options, parse_skip, plan_suite, plan_text, run_suite,
                                     suite_table)

    skipped = parse_skip(skip)
    check_suite_options(scale, semisup_splits)
    directory = out_dir or check_output_dir(Path("results") / "suite" / checkpoint.stem, option="--out-dir")
    out = kwargs["out"] or check_output_file(directory / "suite" / f"{checkpoint.stem}.json")
    if not plan and submitted(click.get_current_context().params, "suite"):
        return
    features = feature_settings(kwargs)
    dist = setup(kwargs["device"])
    run = run_settings(kwargs)
    context = SuiteContext(checkpoint=checkpoint, out_dir=directory, run=run, features=features, dist=dist,
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
    write(payload, out)
    failed = [step for step in payload["steps"] if step["status"] == "failed"]
    if failed:
        first = failed[0]
        raise MokdError(f"suite: step(s) {', '.join(step['step'] for step in failed)} failed ({first['step']}: "
                        f"{first['reason']}; every reason is in the table above); fix and rerun, finished steps are "
                        f"reused")


ANALYSIS_COMMANDS = (consistency, tsne, mad, attention, curves, report, suite)
