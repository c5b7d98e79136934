"""Workers and torch threads sized to the machine (no oversubscription by default)."""

import pytest

from mokd_train.resources import size_resources


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
