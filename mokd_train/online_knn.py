"""The online k-NN monitor: both teachers' k-NN accuracy during training, so a stalled or collapsed run is
seen after an epoch, not at the end.

It reuses the evaluation path exactly (the eval transform of `mokd-eval knn`, `extract_features`, FAISS
`knn_classify`), without the feature cache (the weights change every epoch). Under DDP `extract_features`
shards the images over the ranks and gathers them once; rank 0 alone searches. Results go to the log
and to `<output_dir>/knn.json`, the history of every evaluation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from mokd.core.atomic import write_json
from mokd.core.features import extract_features
from mokd_eval.knn import knn_classify
from mokd.core.pipeline import EvalData, open_eval_data
from mokd.core.registry import ArchSpec

HISTORY_NAME = "knn.json"
KS = (20,)  # DINO's k for ImageNet; the monitor follows one number per model
TEMPERATURE = 0.07


def due(epoch: int, every: int, epochs: int) -> bool:
    """Evaluate after epoch `epoch` (1-based, just finished): every `every` epochs and after the last one."""
    return every > 0 and (epoch % every == 0 or epoch == epochs)


class OnlineKnn:
    """k-NN of every network it is given, on one labelled dataset, with a persistent history."""

    def __init__(self, data: str, image_size: int, run_dir: Path, *, batch_size: int, num_workers: int,
                 device: str, resumed_step: int | None) -> None:
        self.data: EvalData = open_eval_data(data, image_size=image_size)
        self.batch_size, self.num_workers, self.device = batch_size, num_workers, device
        self.path = Path(run_dir) / HISTORY_NAME
        self.history = self._read_history(resumed_step)

    def _read_history(self, resumed_step: int | None) -> list[dict[str, Any]]:
        """Earlier evaluations of a resumed run, up to its resumed step (later ones belong to lost steps)."""
        if resumed_step is None or not self.path.exists():
            return []
        return [entry for entry in json.loads(self.path.read_text())["history"] if entry["step"] <= resumed_step]

    def last_step(self) -> int | None:
        """The global step of the latest evaluation, None before the first."""
        return self.history[-1]["step"] if self.history else None

    def evaluate(self, networks: Sequence[tuple[str, nn.Module, ArchSpec]], *, step: int, epoch: int,
                 is_main: bool) -> dict[str, Any] | None:
        """Top-1 / top-5 of each (name, backbone, spec) at k = 20; every rank extracts, rank 0 returns the
        record (others None). Each backbone's mode and memory layout are restored afterwards, so training
        continues on exactly the weights it had."""
        start = time.perf_counter()
        results = {name: self._accuracy(backbone, spec, name, is_main) for name, backbone, spec in networks}
        record = {"step": step, "epoch": epoch, "k": KS[0], "seconds": round(time.perf_counter() - start, 3),
                  **results}
        self.history.append(record)  # on every rank: all must agree on when the last evaluation was
        if not is_main:
            return None
        write_json(self.path, {"data": self.data.spec.text, "transform": self.data.transform,
                               "temperature": TEMPERATURE, "history": self.history})
        return record

    def _accuracy(self, backbone: nn.Module, spec: ArchSpec, name: str, is_main: bool) -> dict[str, float]:
        was_training = backbone.training
        try:
            train, val = (extract_features(backbone, spec, split, batch_size=self.batch_size,
                                           num_workers=self.num_workers, device=self.device,
                                           desc=f"online k-NN {name} {label}")
                          for label, split in (("train", self.data.train), ("val", self.data.val)))
        finally:  # extract_features switches to eval mode and channels_last (CNNs)
            backbone.train(was_training)
            if not spec.is_vit:
                backbone.to(memory_format=torch.contiguous_format)
        if not is_main:
            return {}
        outcome = knn_classify(train.features, train.labels, val.features, val.labels,
                               num_classes=self.data.train.num_classes, ks=KS, temperature=TEMPERATURE,
                               device=self.device)
        (metrics,) = outcome.metrics.values()  # one k (clamped to the bank on tiny data)
        return {"top1": metrics["top1"], "top5": metrics["top5"]}
