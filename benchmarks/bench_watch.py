"""Benchmark: what watching a run costs. Goals (issue 21): the online k-NN at most 10 % of the epoch time on the
`tiny` preset with --knn-every 1, the TensorBoard writer under 1 % of a step.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_watch.py [--steps 11] [--records 500]

1. Trains `tiny` (digits, 32 px, batch 32: 44 steps per epoch) for `--steps` steps with --knn-every 1
   --tensorboard; the run ends mid-epoch, so the online k-NN runs once at the end (both teachers: extraction of
   the 1437 train and 360 val digits, FAISS search). Its share of an epoch is
   k-NN seconds / (k-NN seconds + 44 x the mean step time), the `epoch_share` the trainer logs after a whole
   epoch (`--steps 44` measures that directly; a quarter epoch keeps the benchmark short on a busy machine).
2. Times `TensorBoardLog.write` on that run's own step records (`--records` writes into a scratch directory)
   and divides by the run's mean step time: the overhead per step at --log-every 1 (the worst case; the tiny
   preset logs every 5th step, the paper recipe every 10th).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from mokd.core.tensorboard_log import TensorBoardLog, scalars
from mokd_train.config import PRESETS, resolve_config
from mokd_train.engine import train

STEPS_PER_EPOCH = 1437 // PRESETS["tiny"]["batch_size"]  # digits: 1437 training images


def train_watched(output_dir: Path, steps: int) -> dict:
    """`steps` steps of tiny with the online k-NN and TensorBoard on; the run's summary."""
    return train(resolve_config("tiny", None, {"output_dir": str(output_dir), "knn_every": 1, "tensorboard": True,
                                               "curves": False, "log_every": 1, "max_steps": steps}))


def writer_seconds(records: list[dict], repeats: int) -> float:
    """Mean seconds of one TensorBoardLog.write of a step record (flushed at close, as in a run)."""
    with tempfile.TemporaryDirectory() as scratch:
        board = TensorBoardLog(Path(scratch), None)
        start = time.perf_counter()
        for index in range(repeats):
            board.write(records[index % len(records)], step=index + 1)
        board.close()
        return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS_PER_EPOCH // 4)
    parser.add_argument("--records", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        run = Path(directory)
        summary = train_watched(run, args.steps)
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    knn = [record for record in records if record["kind"] == "knn"][-1]
    steps = [record for record in records if record["kind"] == "step"]
    step_s = summary["timings"]["mean_step_s"]
    epoch_s = STEPS_PER_EPOCH * step_s
    write_s = writer_seconds(steps, args.records)
    print(f"online k-NN on tiny (digits), both teachers, after step {knn['step']}: {knn['seconds']:.2f} s "
          f"(teacher1 top-1 {knn['teacher1']['top1']:.1f}, teacher2 {knn['teacher2']['top1']:.1f})")
    print(f"  epoch = {STEPS_PER_EPOCH} x {step_s:.3f} s = {epoch_s:.1f} s: the k-NN is "
          f"{100 * knn['seconds'] / (knn['seconds'] + epoch_s):.1f} % of epoch + k-NN (goal <= 10 %)")
    print(f"TensorBoard: {1e3 * write_s:.3f} ms per step record ({len(list(scalars(steps[0])))} scalars) against "
          f"a mean step of {1e3 * step_s:.1f} ms: {100 * write_s / step_s:.3f} % per step at --log-every 1 "
          f"(goal < 1 %)")


if __name__ == "__main__":
    main()
