"""The one results writer: every command leaves a JSON a script can trust, plus a table a person can read.

JSON contract (other tools rely on it): top-level `command`, `protocol` (with `command`, `precision` and, for the
paper's evaluation protocols, `paper` / `differs`), `dataset`, `seed`, `timings`,
`environment`, `config`, and `results`, a list with one entry per evaluated model, each carrying `key`, `arch`,
`checkpoint` and `metrics`.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from mokd.core import atomic
from mokd.core.errors import MokdError

RESULTS_SCHEMA_VERSION = 1
_PACKAGES = ("mokd", "torch", "torchvision", "timm", "faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11",
             "numpy", "scikit-learn")


class StageTimer:
    """Wall-clock seconds per named stage (load, extract, index, search...), accumulated."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def as_dict(self) -> dict[str, float]:
        return {name: round(value, 4) for name, value in self.seconds.items()}


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every result, so a number can be reproduced."""
    import torch

    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "git_sha": _git_sha(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
    }


def build_results(*, command: str, protocol: dict[str, Any], dataset: dict[str, Any], results: list[dict[str, Any]],
                  timings: dict[str, float], seed: int | None, config: dict[str, Any]) -> dict[str, Any]:
    """The results payload. `protocol` always names the command and the precision: fp32 unless the command
    recorded otherwise (the evaluation protocols also record `paper` and `differs`, see mokd_eval/protocols.py)."""
    return {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "protocol": {"command": command, "precision": "fp32", **protocol},
        "dataset": dataset,
        "seed": seed,
        "results": results,
        "timings": timings,
        "config": config,
        "environment": environment(),
    }


def default_out_path(command: str, name: str, root: str | Path = "results") -> Path:
    return Path(root) / command / f"{name}.json"


def start_training_run(out: Path, run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """A training command's results JSON and its run folder (checkpoints, head, logs) hold one run: a new run
    never starts over another's, or a failure half-way would leave a mix of the two on disk."""
    earlier = [path for path in (out, run_dir) if path.is_file() or (path.is_dir() and any(path.iterdir()))]
    if not earlier or resume:
        return
    if not overwrite:
        raise MokdError(f"{earlier[0]} holds an earlier run: pass --resume to continue it, --overwrite to discard "
                        "it and start afresh, or choose another --out")
    for path in earlier:  # tolerant: every torchrun rank removes the same files
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def write_results(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write the results JSON atomically and return its path."""
    return atomic.write_json(path, payload)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None) -> str:
    """A plain monospaced table: first column left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers]] + [[_fmt(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    body = [line(cells[0]), rule] + [line(row) for row in cells[1:]]
    if title:
        body.insert(0, title)
    return "\n".join(body)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)
