"""Workers and torch threads sized to the machine (no oversubscription by default)."""

import pytest

from mokd.core.resources import extraction_workers, size_resources


@pytest.mark.parametrize("cores,processes,device,workers,expected", [
    (2, 1, "cpu", None, (0, 2)),    # the project's machine: everything to torch, loading in-process
    (4, 1, "cpu", None, (0, 4)),
    (16, 1, "cpu", None, (4, 12)),
    (16, 2, "cpu", None, (2, 6)),   # two ranks share the cores
    (32, 4, "cuda", None, (7, 1)),  # GPU computes: loading gets the cores, one kept for the main process
    (2, 1, "cpu", 3, (3, 1)),       # an explicit worker count wins; threads never drop below one
])
def test_size_resources(cores, processes, device, workers, expected):
    sized = size_resources(cores, processes, device, workers)
    assert (sized.workers, sized.threads) == expected
    assert sized.workers + sized.threads <= max(cores // processes, 1) + (workers or 0)


def test_busy_cores_cap_the_threads_on_cpu():
    assert size_resources(2, 1, "cpu", None, busy_cores=0.3).threads == 2  # background noise: both cores
    assert size_resources(2, 1, "cpu", None, busy_cores=0.8).threads == 1  # about one core free
    assert size_resources(2, 1, "cpu", None, busy_cores=11.0).threads == 1  # the shared machine at load 11
    assert size_resources(16, 1, "cpu", None, busy_cores=4.0) == size_resources(16, 1, "cpu", None)  # 12 free
    assert size_resources(32, 4, "cuda", None, busy_cores=30.0).threads == 1


@pytest.mark.parametrize("cores, device, expected", [
    (1, "cpu", 1), (2, "cpu", 1), (8, "cpu", 1), (16, "cpu", 2), (64, "cpu", 4),
    (1, "cuda", 1), (2, "cuda", 1), (4, "cuda", 3), (32, "cuda", 8),
])
def test_extraction_workers(cores, device, expected):
    """In-memory images on CPU: the forward keeps the cores, one worker per 8 of them feeds it; CUDA: loading gets
    the cores."""
    assert extraction_workers(cores, device) == expected


@pytest.mark.parametrize("cores", [1, 2, 16, 64])
def test_image_files_are_loaded_by_threads_on_cpu_and_by_workers_on_cuda(cores):
    """Decoding files beside the forward stalls its threads on CPU at any core count; on CUDA it feeds the GPU."""
    assert extraction_workers(cores, "cpu", decodes_files=True) == 0
    assert extraction_workers(cores, "cuda", decodes_files=True) == extraction_workers(cores, "cuda")
