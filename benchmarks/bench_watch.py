"""Benchmark: what watching a run costs. Goals (issue 21): the online k-NN at most 10 % of the epoch time on the
`tiny` preset with --knn-every 1, the TensorBoard writer under 1 % of a step.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_watch.py [--epochs 1] [--records 500]

1. Trains `tiny` (digits, 32 px, batch 32) for `--epochs` epochs with --knn-every 1 --tensorboard and reads the
   k-NN's share of each epoch from log.jsonl (`epoch_share` = k-NN seconds / (epoch + k-NN seconds); the k-NN
   extracts the 1437 train and 360 val digits with both teachers and searches with FAISS).
2. Times `TensorBoardLog.write` on that run's own step records (`--records` writes into a scratch directory)
   and divides by the run's mean step time: the overhead per step at --log-every 1 (the worst case; the tiny
   preset logs every 5th step, the paper recipe every 10th).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from mokd_eval.tensorboard_log import TensorBoardLog, scalars
from mokd_train.config import PRESETS, resolve_config
from mokd_train.engine import train

DIGITS_TRAIN_IMAGES = 1437


def train_watched(output_dir: Path, epochs: int) -> dict:
    """`epochs` epochs of tiny with the online k-NN after each and TensorBoard on; the run's summary."""
    steps_per_epoch = DIGITS_TRAIN_IMAGES // PRESETS["tiny"]["batch_size"]
    return train(resolve_config("tiny", None, {"output_dir": str(output_dir), "knn_every": 1, "tensorboard": True,
                                               "curves": False, "log_every": 1,
                                               "max_steps": epochs * steps_per_epoch}))


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
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--records", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        run = Path(directory)
        summary = train_watched(run, args.epochs)
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    knn = [record for record in records if record["kind"] == "knn"]
    steps = [record for record in records if record["kind"] == "step"]
    step_s = summary["timings"]["mean_step_s"]
    write_s = writer_seconds(steps, args.records)
    print(f"online k-NN on tiny (digits), --knn-every 1, {len(knn)} evaluations:")
    for record in knn:
        share = f"{100 * record['epoch_share']:.1f} %" if record["epoch_share"] is not None else "-"
        print(f"  after epoch {record['epoch']}: {record['seconds']:.2f} s = {share} of the epoch "
              f"(teacher1 top-1 {record['teacher1']['top1']:.1f}, teacher2 {record['teacher2']['top1']:.1f})")
    shares = [record["epoch_share"] for record in knn if record["epoch_share"] is not None]
    print(f"  mean share {100 * statistics.mean(shares):.1f} % (goal <= 10 %)")
    print(f"TensorBoard: {1e3 * write_s:.3f} ms per step record ("
          f"{len(list(scalars(steps[0])))} scalars) "
          f"against a mean step of {1e3 * step_s:.1f} ms: {100 * write_s / step_s:.2f} % per step at --log-every 1 "
          f"(goal < 1 %)")


if __name__ == "__main__":
    main()
