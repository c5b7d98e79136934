"""DataLoader workers and torch threads sized to the machine, so that a run never oversubscribes its cores.

Measured on a busy 2-core machine: the old default of two workers plus torch's own threads made a `tiny` step
~14x slower than one thread and no workers. Rule, per process (cores shared evenly by the ranks on the node):
- CPU training: the main process computes, so it gets the threads; loading runs in-process on up to 4 cores
  and gets one worker per further 4 cores (at most 4);
- CUDA training: the GPU computes, so loading gets the cores (one is kept for the main process; at most 8).
On a CPU run, torch's threads are further capped by the cores other processes leave free (the 1-minute load
average at start): measured on the shared 2-core machine at load ~11, two threads took ~40 s per `tiny` demo step,
one thread ~4.5 s (OpenMP threads that wait for each other on busy cores).
An explicit `num_workers` wins; an explicit OMP_NUM_THREADS leaves torch's thread count alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

MAX_CPU_WORKERS, MAX_CUDA_WORKERS = 4, 8


@dataclass(frozen=True)
class Resources:
    workers: int
    threads: int


def available_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def size_resources(cores: int, processes_on_node: int, device_type: str, num_workers: int | None,
                   busy_cores: float = 0.0) -> Resources:
    """Workers and threads for one of `processes_on_node` processes sharing `cores` of which `busy_cores` are
    already used by others (the rule above)."""
    processes = max(1, processes_on_node)
    share = max(1, cores // processes)
    if num_workers is None:
        if device_type == "cuda":
            num_workers = min(MAX_CUDA_WORKERS, share - 1)
        else:
            num_workers = 0 if share <= 4 else min(MAX_CPU_WORKERS, share // 4)
    threads = max(1, share - num_workers)
    if device_type != "cuda":
        threads = max(1, min(threads, round((cores - busy_cores) / processes)))
    return Resources(workers=num_workers, threads=threads)


def extraction_workers(cores: int, device_type: str, *, decodes_files: bool = False) -> int:
    """DataLoader workers of feature extraction (inference only), unless given; 0 means loading threads that take
    turns with the forward (`mokd.core.features`).

    On CUDA the GPU computes, so loading gets the cores (one kept for the main process; at most 8). On CPU the
    forward and the loading share the cores. Decoding and resizing image files (~4 core-ms per 500 x 375 JPEG,
    against ~54 core-ms for an R18 forward at 224 px) is best done between two forwards by threads on all cores:
    a worker process running beside the forward's threads stalls them (measured on 2 cores only, 240 JPEGs ->
    R18, paired medians against the bare channels_last forward: threads 94 % over 28 rounds, one worker 78 % over
    12; the same contention is expected at any core count, untested there).
    In-memory images cost microseconds, where a worker's overlap wins: one per 8 cores (1 to 4). Figures and
    method: docs/gpu.md#extraction-on-cpu.
    """
    if device_type == "cuda":
        return max(1, min(MAX_CUDA_WORKERS, cores - 1))
    if decodes_files:
        return 0
    return max(1, min(MAX_CPU_WORKERS, cores // 8))


def apply_resources(device_type: str, num_workers: int | None) -> Resources:
    """Size this process (see module docstring) and set torch's intra-op threads unless OMP_NUM_THREADS is set."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    resources = size_resources(available_cores(), processes, device_type, num_workers, busy_cores=busy)
    if "OMP_NUM_THREADS" in os.environ:
        return Resources(workers=resources.workers, threads=torch.get_num_threads())
    torch.set_num_threads(resources.threads)
    return resources
