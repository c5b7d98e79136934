"""SLURM launch through submitit, on CPU with submitit's local executor: a submitted tiny run, preempted mid-way,
is requeued by submitit's checkpoint hook, resumes and finishes with exactly the weights of an uninterrupted run.
(One job covers both "a submitted run finishes" and "a requeued run resumes": each job start costs ~10 s of
imports.)"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from submitit.local.local import LocalJobEnvironment

import mokd.cli as cli
from mokd.core.errors import MokdError
from mokd.core.registry import ALIASES
from mokd_train import checkpointing
from mokd_train.run_lock import LOCK_NAME, output_dir_lock
from mokd_train.slurm import RequeueableCommand, SlurmRequest, request_from_options, submit, wait_for_job

pytestmark = pytest.mark.slow

TINY = ["--preset", "tiny", "--data", "shapes:50", "--arch2", "test_vit", "--img-size", "16", "--local-size", "8",
        "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1", "--out-dim", "128", "--mlp-hidden-dim", "64",
        "--mlp-bottleneck-dim", "32", "--num-workers", "0", "--log-every", "1", "--no-curves"]


def train_params(output_dir: Path, *extra: str) -> dict:
    """mokd-train's parsed parameters for a tiny run, as the job receives them."""
    return cli.mokd_train.make_context("mokd-train", [*TINY, "--output-dir", str(output_dir), *extra]).params


def local_request(tmp_path: Path) -> SlurmRequest:
    return SlurmRequest(nodes=1, gpus_per_node=0, partition=None, hours=0.25, folder=tmp_path / "slurm")


def load(output_dir: Path) -> dict:
    return torch.load(output_dir / checkpointing.LATEST, map_location="cpu", weights_only=True)


def assert_same_networks(first: dict, second: dict) -> None:
    for network in checkpointing.NETWORKS:
        for key, tensor in first[network].items():
            assert torch.equal(tensor, second[network][key]), f"{network}.{key}"


def preempt(job) -> None:
    """Send the job's task the signal SLURM sends on preemption (submitit's local `_interrupt` signals only the
    controller process, which does not forward it)."""
    controller = job._process.pid
    children = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
    assert len(children) == 1, children
    os.kill(int(children[0]), LocalJobEnvironment._usr_sig())


def test_a_submitted_run_preempted_midway_is_requeued_and_finishes_with_the_uninterrupted_weights(tmp_path,
                                                                                                 monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    reference, preempted = tmp_path / "reference", tmp_path / "preempted"
    settings = ("--max-steps", "9", "--checkpoint-every-steps", "2")
    cli.mokd_train.main([*TINY, "--output-dir", str(reference), *settings], standalone_mode=False)

    job = submit(RequeueableCommand("mokd.cli", "mokd_train", train_params(preempted, *settings, "--no-resume"),
                                    on_requeue={"resume": True}),
                 local_request(tmp_path), name="tiny", cluster="local")
    deadline = time.monotonic() + 120
    while not (preempted / checkpointing.LATEST).exists():  # preempt once a checkpoint is there
        assert time.monotonic() < deadline and not job.done(), "the job wrote no checkpoint"
        time.sleep(0.05)
    preempt(job)
    job.result()  # raises if the job failed
    log = job.stdout() + job.stderr()
    assert "this job is preempted" in log and "Requeued job" in log
    assert "resumed from" in log  # the requeued job resumed (with --no-resume turned off by the hook)
    assert load(preempted)["global_step"] == 9
    assert_same_networks(load(reference), load(preempted))


def test_slurm_options_are_checked_before_submission(tmp_path):
    options = {"slurm": True, "nodes": 0, "gpus_per_node": 1, "partition": None, "time": 1.0,
               "slurm_folder": str(tmp_path)}
    with pytest.raises(MokdError, match="--nodes 0 is out of range"):
        request_from_options(options)
    with pytest.raises(MokdError, match="--time nan is not a finite number"):  # checked with or without --slurm
        request_from_options({**options, "slurm": False, "nodes": 1, "time": float("nan")})
    assert request_from_options({**options, "slurm": False, "nodes": 1}) is None
    request = request_from_options({**options, "nodes": 2, "gpus_per_node": 4})
    assert (request.nodes, request.tasks_per_node, request.hours) == (2, 4, 1.0)


def test_a_user_error_inside_the_job_is_one_line_in_its_log_and_here_with_slurm_wait(tmp_path, monkeypatch):
    """The job's trainer finds its output directory in use (the test holds the lock): the job's error log holds the
    one-line error and no traceback, the job fails, and --slurm-wait prints that line and exits 2."""
    import mokd_train.slurm as slurm

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(slurm, "submit", lambda job, request, name: submit(job, request, name=name, cluster="local"))
    run, logs = tmp_path / "run", tmp_path / "slurm"
    with output_dir_lock(run):
        before = sorted(os.listdir(run))
        holder = (run / LOCK_NAME).read_text().strip()
        result = CliRunner().invoke(cli.mokd_train, [*TINY, "--output-dir", str(run), "--slurm", "--gpus-per-node", "0",
                                                     "--slurm-folder", str(logs), "--slurm-wait"])
        assert sorted(os.listdir(run)) == before
    refusal = (f"--output-dir {run} is in use by another mokd-train run (process id and host: {holder}): wait for it "
               f"to end or stop it, or choose another --output-dir")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: job ") and f"failed: {refusal} (log: " in last, result.output
    log, = logs.glob("*_log.err")
    text = log.read_text()
    assert [line for line in text.splitlines() if line.startswith("error: ")] == [f"error: {refusal}"]
    assert "Traceback" not in text


class FailedJob:
    """A finished job whose command crashed (a bug, not a user error): submitit reports its traceback."""

    job_id = "7"

    class paths:
        stderr = Path("slurm/7_0_log.err")

    def exception(self):
        return Exception("Job (task=0) failed during processing with trace:\nTraceback (most recent call last):\n"
                         "  File \"x.py\", line 1\nValueError: boom\n")

    def stderr(self):
        return "submitit INFO (2026) - Starting\nTraceback (most recent call last):\nValueError: boom\n"


def test_waiting_for_a_job_names_its_failure_in_one_line():
    with pytest.raises(MokdError) as caught:
        wait_for_job(FailedJob())
    assert str(caught.value) == "job 7 failed: ValueError: boom (log: slurm/7_0_log.err)"


@pytest.mark.parametrize("args,message", [
    (["--slurm-wait"], "--slurm-wait applies to a SLURM submission only: add --slurm, or drop it"),
    (["--nodes", "2", "--time", "1"], "--nodes, --time apply to a SLURM submission only: add --slurm, or drop them"),
    (["--gpus-per-node", "0"], "--gpus-per-node applies to a SLURM submission only: add --slurm, or drop it"),
])
def test_slurm_options_without_slurm_are_refused_not_ignored(tmp_path, submitted, args, message):
    run = tmp_path / "run"
    for group, command in ((cli.mokd_train, ["--preset", "tiny", "--output-dir", str(run)]),
                           (cli.mokd_eval, ["suite", "missing.pth", "--out-dir", str(tmp_path / "suite")])):
        result = CliRunner().invoke(group, [*command, *args])
        assert result.exit_code == 2 and result.output.strip().splitlines() == [f"error: {message}"], result.output
    assert not submitted and not run.exists() and not (tmp_path / "suite").exists()


class FakeJob:
    """What `submit` returns, for the printed job id and log paths."""

    job_id = "42"

    class paths:
        stdout, stderr = Path("slurm/42_0_log.out"), Path("slurm/42_0_log.err")


@pytest.fixture
def submitted(monkeypatch) -> list:
    """(job, request) of every submission, none of which reaches a cluster."""
    import mokd_train.slurm as slurm

    jobs: list = []
    monkeypatch.setattr(slurm, "require_submitit", lambda: None)
    monkeypatch.setattr(slurm, "submit", lambda job, request, name: jobs.append((job, request)) or FakeJob())
    return jobs


def test_mokd_train_slurm_checks_the_config_then_submits_with_resume_on_requeue(tmp_path, submitted):
    refused = CliRunner().invoke(cli.mokd_train, ["--preset", "tiny", "--slurm"])
    assert refused.exit_code == 2 and "no output directory" in refused.output and not submitted
    result = CliRunner().invoke(cli.mokd_train, ["--preset", "tiny", "--output-dir", str(tmp_path / "run"), "--slurm",
                                                 "--gpus-per-node", "2", "--slurm-folder", str(tmp_path / "logs")])
    assert result.exit_code == 0, result.output
    assert "submitted job 42" in result.output and not (tmp_path / "run").exists()
    (job, request), = submitted
    assert (request.nodes, request.tasks_per_node, request.hours, request.folder) == (1, 2, 72.0, tmp_path / "logs")
    assert job.params["slurm"] is False and job.params["output_dir"] == str(tmp_path / "run")
    assert job.checkpoint().function.params["resume"] is True


def test_suite_slurm_submits_the_same_suite_which_runs_in_the_job(checkpoint_factory, tmp_path, submitted):
    """`mokd-eval suite --slurm` submits the suite with --slurm off; the submitted callable runs that suite."""
    path, _ = checkpoint_factory.mokd_native(ALIASES["r_tiny"], ALIASES["r_tiny"], name="pair.pth")
    skip = "linear,semisup1,semisup10,cifar10,cifar100,coco,consistency,tsne,mad,report"
    args = ["suite", str(path), "--data", "shapes:50", "--out-dir", str(tmp_path / "suite"), "--skip", skip,
            "--no-cache", "--num-workers", "0", "--slurm", "--nodes", "2", "--gpus-per-node", "4", "--time", "0.5",
            "--slurm-folder", str(tmp_path / "slurm")]
    result = CliRunner().invoke(cli.mokd_eval, args)
    assert result.exit_code == 0, result.output
    assert "submitted job 42" in result.output and "slurm/42_0_log.out" in result.output
    assert not (tmp_path / "suite").exists()  # nothing ran here
    (job, request), = submitted
    assert (request.nodes, request.tasks_per_node, request.hours) == (2, 4, 0.5)
    assert job.command == "suite" and job.params["slurm"] is False
    job.run()  # what the job does after taking the distributed environment from SLURM
    assert (tmp_path / "suite" / "knn" / "pair.json").exists()
