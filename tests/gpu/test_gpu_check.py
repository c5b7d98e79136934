"""`make gpu-check` without a GPU stops at once with one line; its report helpers on crafted inputs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the gpu-check script in a process

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arguments", [[], ["--preflight"]])
def test_without_cuda_it_exits_at_once_with_one_line(tmp_path, arguments):
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides any GPU from torch
    start = time.perf_counter()
    finished = subprocess.run([sys.executable, str(SCRIPT), *arguments, "--json", str(tmp_path / "check.json")],
                              capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=120)
    assert finished.returncode == 2 and finished.stdout == ""
    assert finished.stderr.splitlines() == [load_gpu_check().NO_CUDA]
    assert not (tmp_path / "check.json").exists()
    assert time.perf_counter() - start < 60  # importing torch, nothing else


@pytest.mark.parametrize("root", ["testsuites", "testsuite"])
def test_counts_of_a_junit_report(root):
    suite = '<testsuite name="pytest" tests="9" failures="1" errors="2" skipped="3"></testsuite>'
    report = f"<testsuites>{suite}</testsuites>" if root == "testsuites" else suite
    assert load_gpu_check().test_counts(report) == {"passed": 3, "failed": 3, "skipped": 3}


def test_summary_reads_every_part_of_the_report():
    check = {
        "environment": {"gpu": "Test GPU", "gpus": 2, "torch": "2.9", "cuda": "12.8", "faiss": "1.15.1",
                        "faiss_gpu": True},
        "tests": {"outcome": "ok", "seconds": 80.0, "counts": {"passed": 15, "failed": 0, "skipped": 1}},
        "benchmarks": {
            "train_step": {"outcome": "ok", "seconds": 60.0, "report": {"setups": {"r50-vit_s@224": {
                "batch_size": 32, "time_over_sum_of_alone": {"mokd": 1.25}}}}},
            "knn_and_extraction": {"outcome": "stopped after 180 s", "seconds": 180.0, "report": {
                "config": {"n_train": "1000000", "dim": "384"},
                "knn": [{"method": "dino-style torch", "seconds": 8.0, "speedup": 1.0},
                        {"method": "mokd", "seconds": 2.0, "speedup": 4.0, "differing_top1": {"10": 0}}],
                "extraction": [{"model": "r18 (ResNet)", "data": "imagefolder", "image_size": 224,
                                "extraction_img_s": 900.0, "ratio": 0.9, "reference": "bare channels_last",
                                "reference_img_s": 1000.0}]}}}}
    lines = load_gpu_check().summary_lines(check)
    assert lines[1] == "cuda tests: 15 passed, 0 failed, 1 skipped (ok, 80.0 s)"
    assert "1.25x the two DINO steps' time" in lines[2]
    assert "faiss 2.00 s, torch 8.00 s (4.0x)" in lines[4]
    assert lines[5] == ("extraction r18 on imagefolder at 224 px: 900 img/s = 90% of the bare channels_last "
                        "forward (1000 img/s)")
    assert lines[6] == "k-NN + extraction benchmark: stopped after 180 s (180.0 s)"
