"""Issue 18, class 4: runs are never lost, overwritten or mixed up. A linear resume must come from the same data;
a training command never starts over an earlier run without --resume or --overwrite; two mokd-train processes
never share an output directory (a dead holder's lock frees itself); export never replaces a file silently."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mokd.cli import mokd_eval, mokd_train
from mokd_train.run_lock import LOCK_NAME, output_dir_lock
from tests.cli.test_hardening_tracebacks import assert_one_line_error

FAST = ["--num-workers", "0", "--device", "cpu", "--epochs", "1", "--batch-size", "16"]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def linear(checkpoint: Path, out: Path, data: str, *extra: str):
    return CliRunner().invoke(mokd_eval, ["linear", str(checkpoint), "--mode", "cached", "--data", data, "--no-cache",
                                          "--lr", "0.1", "--out", str(out), *FAST, *extra])


@pytest.fixture
def finished_linear_run(tmp_path, checkpoint_factory, tiny_cnn_spec):
    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    out = tmp_path / "results" / "linear.json"
    result = linear(path, out, "shapes:50")
    assert result.exit_code == 0, result.output
    return path, out


@pytest.mark.slow  # trains a linear probe first
def test_a_finished_run_is_not_started_over_without_resume_or_overwrite(finished_linear_run):
    path, out = finished_linear_run
    before = snapshot(out.parent)
    assert any(name.endswith("head.pt") for name in before) and any("checkpoint" in name for name in before)
    result = linear(path, out, "shapes:60")
    assert_one_line_error(result, str(out), "--resume", "--overwrite")
    assert snapshot(out.parent) == before


@pytest.mark.slow  # trains a linear probe first
def test_overwrite_discards_the_earlier_run_first(finished_linear_run):
    path, out = finished_linear_run
    before = snapshot(out.parent)
    result = linear(path, out, "shapes:60", "--overwrite")
    assert result.exit_code == 0, result.output
    after = snapshot(out.parent)
    assert set(after) == set(before) and after[out.name] != before[out.name]
    assert '"spec": "shapes:60"' in out.read_text()


@pytest.mark.slow  # trains a linear probe first
def test_a_resume_on_other_data_with_the_same_classes_is_refused(finished_linear_run):
    path, out = finished_linear_run
    before = snapshot(out.parent)
    result = linear(path, out, "shapes:60", "--resume")  # 10 classes, like shapes:50
    assert_one_line_error(result, "other data", "/teacher/checkpoint")  # on small data: a cross-validation fold file
    assert snapshot(out.parent) == before
    resumed = linear(path, out, "shapes:50", "--resume")  # the same data resumes
    assert resumed.exit_code == 0, resumed.output


def test_a_second_trainer_on_one_output_dir_is_refused(tmp_path):
    run = tmp_path / "run"
    with output_dir_lock(run):
        assert (run / LOCK_NAME).read_text().split()[0] == str(os.getpid())
        result = CliRunner().invoke(mokd_train, ["--preset", "tiny", "--output-dir", str(run), "--max-steps", "1"])
        assert_one_line_error(result, f"--output-dir {run} is in use", str(os.getpid()))
        assert sorted(os.listdir(run)) == [LOCK_NAME]
    assert not (run / LOCK_NAME).exists()
    with output_dir_lock(run):  # released: taken again at once
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_rank(rank: int, port: int, run: Path) -> subprocess.Popen:
    """One rank of a 2-process torchrun-style mokd-train (gloo on CPU), as the command line runs it."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
           "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
    code = "from mokd.cli import mokd_train\nmokd_train(prog_name='mokd-train')\n"
    return subprocess.Popen([sys.executable, "-c", code, "--preset", "tiny", "--output-dir", str(run),
                             "--device", "cpu", "--num-workers", "0", "--max-steps", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[2])


@pytest.mark.slow  # spawns two training processes
def test_a_refused_lock_ends_every_rank_of_a_distributed_run_with_one_message(tmp_path):
    run = tmp_path / "run"
    with output_dir_lock(run):
        before = snapshot(run)
        port = free_port()
        ranks = [start_rank(rank, port, run) for rank in (0, 1)]
        try:
            outputs = [rank.communicate(timeout=120) for rank in ranks]
        finally:
            for rank in ranks:
                if rank.poll() is None:
                    rank.kill()
                    rank.wait()
        assert [rank.returncode for rank in ranks] == [2, 2], outputs
        rank0_err = outputs[0][1].strip().splitlines()
        assert rank0_err == [f"error: --output-dir {run} is in use by another mokd-train run (process id and host: "
                             f"{before[LOCK_NAME].decode().strip()}): wait for it to end or stop it, or choose "
                             f"another --output-dir"], outputs
        assert outputs[1] == ("", ""), outputs  # rank 1 ends as quietly as any non-zero rank
        assert "Traceback" not in "".join(outputs[0])
        assert snapshot(run) == before


@pytest.mark.slow  # spawns the process that holds the lock
def test_the_lock_of_a_killed_trainer_does_not_block(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from mokd_train.run_lock import output_dir_lock\n"
                               f"with output_dir_lock(Path({str(run)!r})):\n"
                               "    print('locked', flush=True)\n    time.sleep(60)\n"],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(Exception, match="in use by another mokd-train run"):
            with output_dir_lock(run):
                pass
        os.kill(holder.pid, signal.SIGKILL)  # no cleanup runs: the lock file stays, its lock goes
        holder.wait(timeout=30)
        assert (run / LOCK_NAME).exists()
        with output_dir_lock(run):
            assert (run / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_export_refuses_to_replace_a_file_without_overwrite(tmp_path, checkpoint_factory, tiny_cnn_spec):
    path, _ = checkpoint_factory.dino(tiny_cnn_spec)
    target = tmp_path / "notes.txt"
    target.write_bytes(b"someone's unrelated file\n")
    args = ["export", str(path), "--format", "timm", "-o", str(target), "--out", str(tmp_path / "export.json")]
    result = CliRunner().invoke(mokd_eval, args)
    assert_one_line_error(result, f"--output {target} already exists", "--overwrite")
    assert target.read_bytes() == b"someone's unrelated file\n" and not (tmp_path / "export.json").exists()
    result = CliRunner().invoke(mokd_eval, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert target.read_bytes() != b"someone's unrelated file\n"
