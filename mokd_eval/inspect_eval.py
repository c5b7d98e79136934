"""`mokd-eval inspect`: what a checkpoint holds (format, keys, models with their architecture, sizes, epoch),
as a results payload and as the lines the command prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mokd.core.checkpoints import inspect_checkpoint
from mokd.core.results import build_results


def run_inspect(checkpoint: Path, *, trust: bool) -> dict[str, Any]:
    """Inspect `checkpoint`; returns the results payload (not yet written), the report under config.inspection."""
    report = inspect_checkpoint(checkpoint, trust=trust)
    models = [{"key": entry["key"], "arch": entry["arch"], "metrics": {}, **entry} for entry in report["models"]]
    return build_results(command="inspect", protocol={}, dataset={}, results=models, timings={}, seed=None,
                         config={"checkpoint": str(checkpoint), "inspection": report})


def inspection_text(payload: dict[str, Any]) -> str:
    """The inspection as the lines `inspect` prints: the file, then one block per model."""
    report = payload["config"]["inspection"]
    lines = [f"file: {report['path']}", f"format: {report['format']}", f"sha256: {report['sha256']}",
             f"epoch: {report.get('epoch')}", f"top-level keys: {', '.join(report['top_level_keys'])}",
             f"default models: {', '.join(report['default_keys'])}"]
    for entry in report["models"]:
        lines.append(f"- {entry['key']}: {entry['describe']}{' (inferred)' if entry['inferred'] else ''}")
        lines.append(f"    backbone {entry['backbone_tensors']} tensors / {entry['backbone_params']:,} params; "
                     f"heads {entry['head_tensors']} tensors / {entry['head_params']:,} params"
                     f" ({', '.join(entry['head_prefixes']) or 'none'})")
    return "\n".join(lines)
