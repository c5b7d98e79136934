"""Shared fixtures: checkpoint builders (tests/checkpoint_files.py), small architectures, torch's thread count.

torch, timm and the builders are imported inside the fixtures: under `make test-fast` the controlling
pytest-xdist process loads this file too, and importing them there would delay every worker by ~5 s.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from checkpoint_files import CheckpointFactory
    from mokd.core.registry import ArchSpec


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Commands size torch's threads to the machine's load (`mokd.core.resources.apply_resources`): no test may
    leave that choice to the tests after it, whose numbers would then depend on the order and load of the run."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def checkpoint_factory(tmp_path: Path) -> CheckpointFactory:
    """Builds checkpoints of every supported layout in the test's tmp_path."""
    from checkpoint_files import CheckpointFactory

    return CheckpointFactory(tmp_path)


@pytest.fixture(scope="session")
def tiny_cnn_spec() -> ArchSpec:
    """r_tiny: BasicBlock [1,1,1,1], widths 16..128, CIFAR stem, 32 px."""
    from mokd.core.registry import ALIASES

    return ALIASES["r_tiny"]


@pytest.fixture(scope="session")
def tiny_vit_spec() -> ArchSpec:
    """ViT-Tiny dimensions with 4-px patches at 32 px: 64 tokens, fast on CPU."""
    from mokd.core.registry import ALIASES

    return dataclasses.replace(ALIASES["vit_t"], name="vit[dim=192,depth=12,patch=4]", img_size=32, patch_size=4)


NO_CUDA_REASON = "needs a CUDA device (torch.cuda.is_available() is False here); run `make gpu-check` on a GPU machine"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` compare a CUDA path with the CPU path: skipped, with the reason, where torch sees no GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
