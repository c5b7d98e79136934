"""Training curves of one or more `mokd-train` runs, read from their log.jsonl, in the project's figure style.

Six panels: each model's loss terms, the learning rates, the collapse monitor (teacher entropy, student
pairwise cosine) and the online k-NN. Several runs (e.g. Independent and MOKD) are overlaid: colour = run,
line style = loss term or model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.lines import Line2D

from mokd_analysis import style
from mokd.core.errors import MokdError

LOG_NAME = "log.jsonl"  # written by mokd_train.engine
TERM_STYLES = ("-", "--", ":", "-.")
MODEL_STYLES = ("-", "--")
TOTAL = "loss"  # loss1 / loss2: each model's whole objective


@dataclass
class RunCurves:
    """The series of one run: x = global step, y per named quantity."""

    label: str
    losses: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    lr: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    monitor: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    knn: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def read_run(run_dir: Path) -> RunCurves:
    """The curves of `run_dir`, labelled by its directory name and training mode."""
    log = Path(run_dir) / LOG_NAME
    if not log.is_file():
        raise MokdError(f"{run_dir} is not a mokd-train run directory: {LOG_NAME} is missing")
    curves = RunCurves(label=_label(Path(run_dir)))
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a crash can cut the last line
            continue
        step, kind = record.get("step"), record.get("kind")
        if kind == "step":
            _extend(curves.losses, record["losses"], step)
            _extend(curves.lr, {name: value for name, value in record["lr"].items() if "_" not in name}, step)
        elif kind == "epoch":
            _extend(curves.monitor, record.get("monitor", {}), step)
        elif kind == "knn":
            _extend(curves.knn, {name: value["top1"] for name, value in record.items()
                                 if isinstance(value, dict) and "top1" in value}, step)
    return curves


def _label(run_dir: Path) -> str:
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        return run_dir.name
    config = json.loads(config_path.read_text())
    return f"{run_dir.name} ({config.get('method', 'mokd')}, {config.get('mode', 'mokd')})"


def _extend(series: dict[str, list[tuple[int, float]]], values: dict[str, Any], step: int) -> None:
    for name, value in values.items():
        if value is not None:
            series.setdefault(name, []).append((step, float(value)))


def default_stem(run_dirs: list[Path]) -> Path:
    """<run>/curves for one run (next to its log), results/curves/<a>_vs_<b> for several."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "curves"
    return Path("results") / "curves" / "_vs_".join(Path(directory).name for directory in run_dirs)


def draw_curves(run_dirs: list[Path], out_stem: Path) -> dict[str, str]:
    """Draw the runs' curves into `<out_stem>.png` and `.pdf`; returns both paths."""
    runs = [read_run(Path(directory)) for directory in run_dirs]
    colours = style.palette(len(runs))
    with style.paper_style():
        fig, axes = style.figure(width=style.TEXT_WIDTH, height=4.0, ncols=3, nrows=2)
        for model in (1, 2):
            _plot_losses(axes[0][model - 1], runs, colours, model)
        _plot_per_model(axes[0][2], runs, colours, lambda run: run.lr, "{}", "learning rate")
        _plot_per_model(axes[1][0], runs, colours, lambda run: run.monitor, "teacher_entropy{}", "teacher entropy")
        _plot_per_model(axes[1][1], runs, colours, lambda run: run.monitor, "student_cos{}",
                        "student pairwise cosine")
        _plot_per_model(axes[1][2], runs, colours, lambda run: run.knn, "teacher{}", "online k-NN top-1 (%)")
        handles = [axes[0][0].plot([], [], color=colour, label=run.label)[0] for run, colour in zip(runs, colours)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(runs), 3), frameon=False)
        fig.subplots_adjust(left=0.08, right=0.98, top=0.94, bottom=0.18, wspace=0.35, hspace=0.5)
        Path(out_stem).parent.mkdir(parents=True, exist_ok=True)
        return style.save(fig, out_stem)


def _plot_losses(ax, runs: list[RunCurves], colours: list[str], model: int) -> None:
    """Every loss term of `model` (names ending in its number), one line style per term; the total thick."""
    for run, colour in zip(runs, colours):
        terms = sorted(name for name in run.losses if name.endswith(str(model)) and not name.startswith(TOTAL))
        for term, line in zip(terms, TERM_STYLES):
            _line(ax, run.losses[term], colour, line, label=term[:-1])
        if f"{TOTAL}{model}" in run.losses:
            _line(ax, run.losses[f"{TOTAL}{model}"], colour, "-", label="total", width=2.4, alpha=0.45)
    _finish(ax, f"loss terms, model {model}", legend=True)


def _plot_per_model(ax, runs: list[RunCurves], colours: list[str], series, pattern: str, title: str) -> None:
    """One line per run and model: solid = model 1, dashed = model 2."""
    for run, colour in zip(runs, colours):
        values = series(run)
        for model, line in zip((1, 2), MODEL_STYLES):
            name = pattern.format(model)
            if name in values:
                _line(ax, values[name], colour, line, label=f"model {model}")
    _finish(ax, title, legend=True)


def _line(ax, points: list[tuple[int, float]], colour: str, line: str, label: str, *, width: float | None = None,
          alpha: float = 1.0) -> None:
    steps, values = zip(*points)
    ax.plot(steps, values, color=colour, linestyle=line, label=label, linewidth=width, alpha=alpha,
            marker="o" if len(points) < 3 else None)


def _finish(ax, title: str, *, legend: bool) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    if not ax.lines:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color=style.CONTROL_COLOUR)
        return
    if legend:  # one black entry per line style (the runs' colours are in the figure legend)
        styles = {line.get_label(): line for line in ax.lines}
        handles = [Line2D([], [], color="black", linestyle=line.get_linestyle(), linewidth=line.get_linewidth(),
                          alpha=line.get_alpha()) for line in styles.values()]
        ax.legend(handles, styles.keys(), frameon=False, fontsize=5)
