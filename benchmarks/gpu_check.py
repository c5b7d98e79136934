"""`make gpu-check`: do the CUDA paths work, and how fast are they? One command for a GPU machine's first hour.

Usage: python benchmarks/gpu_check.py [--json gpu-check.json] [--preflight]

1. the `cuda` tests (tests/test_cuda.py: every CUDA path against the CPU path);
2. the GPU benchmarks, each in its own process: a MOKD pair step against the two models' DINO steps (R50 + ViT-S,
   224/96 px crops, 8 locals), k-NN over a 1M x 384 bank (faiss-gpu against a torch search on the GPU), and feature
   extraction against the fastest bare forward (generated shapes, and 500 x 375 JPEGs through an ImageFolder);
3. one JSON with all of it, and a summary of the ratios.

Without CUDA it stops at once with one line (exit 2); `--preflight` does only that check, so that `make` can stop
before it swaps faiss-cpu for faiss-gpu. Exit 1 when a test failed or a benchmark did not finish.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = "gpu-check: torch sees no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine"
# Seconds each part may take before it is stopped and reported as unfinished: 10 minutes in all on one GPU.
BUDGET = {"tests": 240, "train_step": 120, "knn_and_extraction": 180}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("gpu-check.json"))
    parser.add_argument("--preflight", action="store_true", help="only check that torch sees a GPU")
    parser.add_argument("--train-batch", type=int, default=32, help="images per pair step (R50 + ViT-S)")
    parser.add_argument("--bank", type=int, default=1_000_000, help="k-NN bank rows (384 dims)")
    return parser.parse_args()


def test_counts(junit_xml: str) -> dict[str, int]:
    """passed / failed / skipped counts of a pytest JUnit report (errors count as failed)."""
    root = ElementTree.fromstring(junit_xml)
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {name: sum(int(suite.get(name, 0)) for suite in suites) for name in ("tests", "failures", "errors", "skipped")}
    failed = total["failures"] + total["errors"]
    return {"passed": total["tests"] - failed - total["skipped"], "failed": failed, "skipped": total["skipped"]}


def run_part(name: str, command: list[str], json_path: Path | None) -> dict:
    """Run one part in its own process within its time budget; its JSON (when it wrote one) and how it ended."""
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, cwd=ROOT, timeout=BUDGET[name])
        outcome = "ok" if completed.returncode == 0 else f"exit {completed.returncode}"
    except subprocess.TimeoutExpired:
        outcome = f"stopped after {BUDGET[name]} s"
    result: dict = {"outcome": outcome, "seconds": round(time.perf_counter() - start, 1)}
    if json_path is not None and json_path.exists():
        result["report"] = json.loads(json_path.read_text())
    return result


def run_tests(scratch: Path) -> dict:
    report = scratch / "tests.xml"
    part = run_part("tests", [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                              f"--junitxml={report}", "tests/test_cuda.py"], None)
    if report.exists():
        part["counts"] = test_counts(report.read_text())
    return part


def run_benchmarks(args: argparse.Namespace, scratch: Path) -> dict:
    train_json, knn_json = scratch / "train_step.json", scratch / "knn.json"
    return {
        "train_step": run_part("train_step", [
            sys.executable, "benchmarks/bench_train_step.py", "--device", "cuda", "--setups", "r50-vit_s@224",
            "--batch-size", str(args.train_batch), "--steps", "5", "--warmup", "2", "--methods", "--json", str(train_json)],
            train_json),
        "knn_and_extraction": run_part("knn_and_extraction", [
            sys.executable, "benchmarks/bench_knn.py", "--device", "cuda", "--n-train", str(args.bank), "--dim", "384",
            "--num-classes", "1000", "--extraction-rounds", "1", "--json", str(knn_json)], knn_json),
    }


def environment() -> dict:
    from mokd_eval import knn

    return {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "faiss": getattr(knn.faiss, "__version__", None),
            "faiss_gpu": knn.faiss_has_gpu_support()}


def summary_lines(check: dict) -> list[str]:
    """The figures to read first; every number is also in the JSON."""
    lines = [f"GPU: {check['environment']['gpu']} x{check['environment']['gpus']}, torch {check['environment']['torch']} "
             f"(CUDA {check['environment']['cuda']}), faiss {check['environment']['faiss']} "
             f"(GPU support: {check['environment']['faiss_gpu']})"]
    tests = check["tests"]
    counts = tests.get("counts", {})
    lines.append(f"cuda tests: {counts.get('passed', '?')} passed, {counts.get('failed', '?')} failed, "
                 f"{counts.get('skipped', '?')} skipped ({tests['outcome']}, {tests['seconds']} s)")
    train = check["benchmarks"]["train_step"]
    for setup, figures in train.get("report", {}).get("setups", {}).items():
        ratio = figures["time_over_sum_of_alone"]["mokd"]
        lines.append(f"pair step {setup} at batch {figures['batch_size']}: {ratio:.2f}x the two DINO steps' time "
                     f"(paper, 8 V100: 0.64x)")
    lines.append(f"train-step benchmark: {train['outcome']} ({train['seconds']} s)")
    knn_part = check["benchmarks"]["knn_and_extraction"]
    report = knn_part.get("report", {})
    rows = {row["method"]: row for row in report.get("knn", [])}
    if {"mokd", "dino-style torch"} <= rows.keys():
        lines.append(f"k-NN {report['config']['n_train']} x {report['config']['dim']}: faiss {rows['mokd']['seconds']:.2f} s, "
                     f"torch {rows['dino-style torch']['seconds']:.2f} s ({rows['mokd']['speedup']:.1f}x), differing "
                     f"top-1: {rows['mokd']['differing_top1']}")
    for row in report.get("extraction", []):
        lines.append(f"extraction {row['model'].split(' ')[0]} on {row['data']} at {row['image_size']} px: "
                     f"{row['extraction_img_s']:.0f} img/s = {100 * row['ratio']:.0f}% of the {row['reference']} "
                     f"forward ({row['reference_img_s']:.0f} img/s)")
    lines.append(f"k-NN + extraction benchmark: {knn_part['outcome']} ({knn_part['seconds']} s)")
    return lines


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    if args.preflight:
        return 0
    from mokd.core.atomic import write_json

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as directory:
        scratch = Path(directory)
        check = {"environment": environment(), "tests": run_tests(scratch)}
        check["benchmarks"] = run_benchmarks(args, scratch)
    write_json(args.json, check)
    print("\n" + "\n".join(summary_lines(check)) + f"\nwritten: {args.json}")
    unfinished = [part for part in (check["tests"], *check["benchmarks"].values()) if part["outcome"] != "ok"]
    return 1 if unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
