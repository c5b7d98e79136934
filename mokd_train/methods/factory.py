"""Builds the pair module of a non-MOKD method. Kept apart from the method names in `__init__`, which the
config reads: the implementations import the config's types, so the names must not import them back."""

from __future__ import annotations

from mokd.core.registry import ArchSpec
from mokd_train.methods.base import PeerPair
from mokd_train.methods.dogo import DogoPair
from mokd_train.methods.mcl import MclPair


def build_peer_pair(specs: tuple[ArchSpec, ArchSpec], cfg) -> PeerPair:
    """The pair module of a non-MOKD method (`cfg` is a resolved `TrainConfig`)."""
    family = cfg.method.removeprefix("dino+")
    return {"dogo": DogoPair, "mcl": MclPair}[family](specs, cfg)
