"""TensorBoard scalars mirroring the JSON-lines logs (mokd-train, the fine-tuning protocols, the detector), for
people who watch runs in TensorBoard.

Every number of a log record becomes one scalar whose tag is its path in the record (`losses/sm1`,
`lr/1`, `monitor/teacher_entropy1`, `knn/teacher1/top1`), at the record's global step. Rank 0 writes;
a resumed run purges the events past its resumed step, so the curves continue without a fold-back.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

from mokd.core.errors import MokdError

INSTALL_HINT = "pip install 'mokd[tensorboard]'"
DIRECTORY = "tensorboard"
# Fields that identify a record rather than measure anything.
_NOT_SCALARS = {"kind", "step", "epoch", "step_in_epoch", "steps", "iteration"}


def require_tensorboard(wanted: bool = True) -> bool:
    """Fail early, in one line, when --tensorboard is asked for (`wanted`) without the package."""
    if wanted:
        try:
            import torch.utils.tensorboard  # noqa: F401  (imports the `tensorboard` package)
        except ImportError:
            raise MokdError(f"--tensorboard needs the tensorboard package: {INSTALL_HINT}") from None
    return wanted


def scalars(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) for every finite number in `record`, nested dicts joined with '/'; booleans, text and
    identifying fields (step, epoch, kind) are left out."""
    for key, value in record.items():
        if not prefix and key in _NOT_SCALARS:
            continue
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from scalars(value, f"{tag}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield tag, float(value)


class TensorBoardLog:
    """A SummaryWriter under <run>/tensorboard/ fed with the same records as log.jsonl."""

    def __init__(self, run_dir: Path, resumed_step: int | None, section: str = "") -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a crashed run wrote after its last checkpoint.
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / DIRECTORY),
                                    purge_step=resumed_step + 1 if resumed_step is not None else None)
        self.section = f"{section}/" if section else ""

    def write(self, record: dict[str, Any], step: int | None = None) -> None:
        """Each scalar of `record` at `step` (default: the record's own `step`)."""
        step = record["step"] if step is None else step
        kind = record.get("kind")
        for tag, value in scalars(record):
            self.writer.add_scalar(f"{self.section}{kind}/{tag}" if kind else f"{self.section}{tag}", value, step)

    def flush(self) -> None:
        """Write pending events now (per epoch in the protocols, whose epochs are long)."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
