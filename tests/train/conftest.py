"""The demo commands shrunk for tests: two steps of a tiny pair on 60 small shape images."""

from types import ModuleType
from typing import Callable

import pytest

SMALL_DEMO_DATA = "shapes:60"
SMALL_DEMO_SETTINGS = {
    "img_size": 16, "local_size": 8, "epochs": 1, "batch_size": 8, "max_steps": 2, "out_dim": 64,
    "mlp_hidden_dim": 32, "mlp_bottleneck_dim": 16, "num_workers": 0, "warmup_epochs": 0}


@pytest.fixture
def shrink_demo(monkeypatch) -> Callable[..., None]:
    """Gives a demo module (`demo`, `compare`) the small data and settings; keyword arguments add settings."""
    def shrink(module: ModuleType, **settings) -> None:
        monkeypatch.setattr(module, "DEMO_DATA", SMALL_DEMO_DATA)
        monkeypatch.setattr(module, "DEMO_SETTINGS", {**SMALL_DEMO_SETTINGS, **settings})
    return shrink
