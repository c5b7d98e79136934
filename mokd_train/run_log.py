"""The trainer's run log, `log.jsonl`: one JSON record per step, epoch and k-NN evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mokd.core.atomic import write_text


class JsonLinesLog:
    """`log.jsonl`, one JSON record per line, written by rank 0 only.

    Appending is the one write that is not atomic (rewriting the whole log every step would be
    quadratic). A crash can cut at most the last line; on resume the log is rewritten atomically with
    only the complete records up to the resumed step, so the log always describes one run.
    """

    def __init__(self, path: Path, resumed_step: int | None) -> None:
        self.path = path
        kept = []
        if resumed_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= resumed_step:
                    kept.append(line + "\n")
        write_text(path, "".join(kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
