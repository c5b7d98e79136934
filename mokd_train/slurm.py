"""Launching `mokd-train` and `mokd-eval suite` on a SLURM cluster through submitit.

The job runs the very click command the user typed (minus `--slurm`), one process per GPU, with the
torch.distributed environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) taken from SLURM, so
`mokd.core.distributed.setup` joins the group exactly as under torchrun. On preemption or time-out
submitit calls `checkpoint`, which resubmits the same command: training resumes from its latest
checkpoint (at most `--checkpoint-every-steps` steps are redone) and the suite reuses its finished steps.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mokd.core.errors import EXIT_USER_ERROR, MokdError
from mokd.core.validation import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Range, check_number, check_output_dir

INSTALL_HINT = "pip install 'mokd[slurm]'"
SIGNAL_DELAY_S = 120  # time between SLURM's warning signal and the kill: enough to leave a step cleanly
OPTION_NAMES = ("slurm", "nodes", "gpus_per_node", "partition", "time", "slurm_folder", "slurm_wait")


@dataclass(frozen=True)
class SlurmRequest:
    """What to ask SLURM for."""

    nodes: int
    gpus_per_node: int
    partition: str | None
    hours: float
    folder: Path

    @property
    def tasks_per_node(self) -> int:
        """One process per GPU; one on a CPU-only node."""
        return max(self.gpus_per_node, 1)


# The numbers of a SLURM request, by parameter name (the one validation place's ranges).
SLURM_NUMBER_RULES: dict[str, Range] = {"nodes": AT_LEAST_ONE, "gpus_per_node": NON_NEGATIVE, "time": POSITIVE}


def check_slurm_numbers(options: dict[str, Any]) -> None:
    """NaN, infinity and meaningless values are refused whether or not --slurm is given."""
    for name, allowed in SLURM_NUMBER_RULES.items():
        check_number(options[name], "--" + name.replace("_", "-"), allowed)


def request_from_options(options: dict[str, Any]) -> SlurmRequest | None:
    """The SlurmRequest of the command-line options (keys OPTION_NAMES), None without --slurm. Checks the
    values and that submitit is installed, before anything is submitted."""
    check_slurm_numbers(options)
    if not options["slurm"]:
        return None
    require_submitit()
    folder = check_output_dir(Path(options["slurm_folder"]), option="--slurm-folder")
    return SlurmRequest(options["nodes"], options["gpus_per_node"], options["partition"], options["time"], folder)


def require_submitit() -> None:
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise MokdError(f"--slurm needs the submitit package: {INSTALL_HINT}") from None


class RequeueableCommand:
    """A click command of module `module` with its parsed parameters, run in a submitit job and resubmitted
    unchanged (plus `on_requeue`, e.g. resume=True) when the job is preempted or times out."""

    def __init__(self, module: str, command: str, params: dict[str, Any],
                 on_requeue: dict[str, Any] | None = None) -> None:
        self.module, self.command, self.params = module, command, dict(params)
        self.on_requeue = dict(on_requeue or {})

    def __call__(self) -> None:
        import submitit

        # CUDA_VISIBLE_DEVICES stays whole: each rank picks GPU LOCAL_RANK, as under torchrun.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        try:
            self.run()
        except MokdError as error:  # as on the command line: one line in the job's error log, exit status 2
            if error.printed:
                print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    def run(self) -> None:
        """The command itself, in this process."""
        import click

        command = getattr(importlib.import_module(self.module), self.command)
        with click.Context(command) as ctx:
            ctx.params = dict(self.params)  # what the command reads back as its own parsed options
            ctx.invoke(command.callback, **self.params)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's hook on preemption / time-out: the same command again, which resumes by itself."""
        import submitit

        resubmitted = RequeueableCommand(self.module, self.command, {**self.params, **self.on_requeue})
        return submitit.helpers.DelayedSubmission(resubmitted)


def submit(job: RequeueableCommand, request: SlurmRequest, *, name: str, cluster: str | None = None):
    """Submit `job` (cluster None = SLURM when available; "local" runs it on this machine, for tests) and
    return the submitit Job."""
    import submitit

    executor = submitit.AutoExecutor(folder=request.folder, cluster=cluster)
    partition = {"slurm_partition": request.partition} if request.partition else {}
    executor.update_parameters(name=name, nodes=request.nodes, gpus_per_node=request.gpus_per_node,
                               tasks_per_node=request.tasks_per_node, timeout_min=max(round(request.hours * 60), 1),
                               slurm_signal_delay_s=SIGNAL_DELAY_S, **partition)
    return executor.submit(job)


def wait_for_job(job) -> None:
    """Block until `job` ends. A failed job is a `MokdError` carrying the job's own error line (the command's
    one-line error from its log, else the last line submitit reports) and where its log is."""
    failure = job.exception()
    if failure is None:
        return
    errors = [line for line in (job.stderr() or "").splitlines() if line.startswith("error: ")]
    reported = [line for line in str(failure).splitlines() if line.strip()]
    reason = errors[-1].removeprefix("error: ") if errors else (reported[-1].strip() if reported else "no output")
    raise MokdError(f"job {job.job_id} failed: {reason} (log: {job.paths.stderr})")


def describe_job(job) -> str:
    """The job id and where its logs go (printed after submission)."""
    return (f"submitted job {job.job_id}\n  stdout: {job.paths.stdout}\n  stderr: {job.paths.stderr}\n"
            f"  follow it with: squeue -j {job.job_id}; tail -f {job.paths.stdout}")
