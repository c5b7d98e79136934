"""The online-distillation methods `mokd-train --method` offers, beside MOKD itself (`mokd_train.pair`).

This module only names them and their settings (imported by `mokd_train.config`); the implementations
are `dogo.py` and `mcl.py` on the common `base.PeerPair`, built by `factory.build_peer_pair`.

- `dogo`, `mcl`: the faithful methods (spec `online-kd-peers.md`): their own heads, losses, optimizers.
- `dino+dogo`, `dino+mcl`: ADAPTATIONS (not published methods): DINO self-distillation on each model,
  with the peer method's cross terms in place of MOKD's; MOKD's optimisation recipe.
"""

from __future__ import annotations

from typing import Any

METHODS = ("mokd", "dogo", "mcl", "dino+dogo", "dino+mcl")
FAITHFUL_PEERS = frozenset({"dogo", "mcl"})
LABELS = {
    "mokd": "MOKD",
    "dogo": "DoGo",
    "mcl": "MCL",
    "dino+dogo": "DINO+DoGo (adaptation)",
    "dino+mcl": "DINO+MCL (adaptation)",
}
# Cross-term weights when --lambda1/--lambda2 are not given (MOKD's own rule lives in config.resolved_lambdas):
# DoGo's only shipped config weighs model 1's relation KL by 100 and model 2's by 1; MCL weighs every term by 1.
DEFAULT_LAMBDAS = {"dogo": (100.0, 1.0), "dino+dogo": (100.0, 1.0), "mcl": (1.0, 1.0), "dino+mcl": (1.0, 1.0)}
# Settings each method changes relative to the MOKD defaults and presets (applied after the preset, before
# YAML and flags). The faithful methods train on two views only and neither clip gradients nor freeze layers.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "mokd": {},
    "dogo": {"n_local": 0, "clip_grad": 0.0, "freeze_last_layer": 0, "warmup_epochs": 0},
    "mcl": {"n_local": 0, "clip_grad": 0.0, "freeze_last_layer": 0, "warmup_epochs": 0, "momentum_teacher": 0.999},
    "dino+dogo": {},
    "dino+mcl": {},
}
# Methods whose EMA momentum stays at momentum_teacher (MoCo's key encoders) instead of DINO's cosine to 1.
CONSTANT_EMA = frozenset({"mcl"})
# Queue length of the MCL methods on the CPU-sized `tiny` preset (digits has 1,437 training images).
TINY_QUEUE_SIZE = 1024
# MOKD's cross-term weights in the `tiny` recipe (why: TINY_PRESET in mokd_train/config.py). A method setting, not
# a preset one, so that DoGo and MCL keep their own weights (DEFAULT_LAMBDAS) on `tiny`.
TINY_MOKD_LAMBDAS = {"lambda1": 0.1, "lambda2": 0.1}


def method_label(method: str) -> str:
    """How tables and logs name a method; adaptations say so."""
    return LABELS.get(method, method)


def method_defaults(method: str, preset: str | None) -> dict[str, Any]:
    """The method's settings layer for `preset` (see METHOD_DEFAULTS)."""
    defaults = dict(METHOD_DEFAULTS.get(method, {}))
    if preset == "tiny" and method in ("mcl", "dino+mcl"):
        defaults["queue_size"] = TINY_QUEUE_SIZE
    if preset == "tiny" and method == "mokd":
        defaults.update(TINY_MOKD_LAMBDAS)
    return defaults
