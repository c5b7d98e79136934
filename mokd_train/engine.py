"""The MOKD training loop around a `MokdPair`; its data (`data`), optimisers and schedules (`optim`), run log
(`run_log`) and checkpoints (`checkpointing`) live beside it.

Per step (official recipe): per-iteration lr / weight decay, the pair's forward with the backward of each
model's loss as soon as it exists and is finite, followed at once by that model's update (MOKD: L1, then L2,
so one model's activations and one model's gradients are alive at a time; equal to one backward of L1 + L2
and two optimizer steps at the end, since L2 reads teacher 1 but never student 1; with fp16 each loss is
scaled by its own model's GradScaler): per-tensor gradient clipping, last layers frozen during the first
epoch(s), one optimizer step per model (SGD for a ResNet, AdamW for a ViT). Then the EMA update of both
teachers.

Reproducibility: each sample's crops are drawn from an RNG seeded by (seed, epoch, index) and the
order comes from a sampler seeded by seed + epoch, so a run resumed mid-epoch on CPU reproduces the
uninterrupted one exactly, and W processes see the global batches of one.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any, ContextManager

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mokd.core import distributed
from mokd.core.atomic import write_json
from mokd.core.data import open_dataset, parse_data_spec
from mokd.core.distributed import DistContext, EpochShardSampler, ddp_wrapper, synchronise_batchnorm
from mokd.core.errors import MokdError
from mokd.core.resources import apply_resources
from mokd.core.tensorboard_log import TensorBoardLog
from mokd.core.training_loop import (amp_dtype, autocast_context, clip_gradients_per_tensor, make_scaler,
                                     optimizer_step, scale_loss)
from mokd_train import checkpointing, online_knn
from mokd_train.augment import MultiCropAugmentation
from mokd_train.checkpointing import Progress
from mokd_train.config import TrainConfig, arch_specs, describe, resolved_lambdas, validate
from mokd_train.data import SeededCrops, multicrop_config, replaced_images_report
from mokd_train.losses import NonFiniteLossError
from mokd_train.methods.factory import build_peer_pair
from mokd_train.methods.base import PeerPair
from mokd_train.monitor import MONITORED, diagnose
from mokd_train.online_knn import OnlineKnn
from mokd_train.optim import build_optimizer, build_schedules, schedule_family
from mokd_train.pair import MokdPair, PairConfig
from mokd_train.run_lock import run_output_dir_lock
from mokd_train.run_log import JsonLinesLog

LOG_NAME = "log.jsonl"
CONFIG_NAME = "config.json"


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) the pair `cfg` describes; returns a summary of the run."""
    validate(cfg)
    context = distributed.setup(cfg.device)
    try:
        with run_output_dir_lock(Path(cfg.output_dir), context):
            return Trainer(cfg, context).run()
    finally:
        distributed.teardown(context)


def save_initial_checkpoint(cfg: TrainConfig) -> Path:
    """Write the networks exactly as `train(cfg)` would start them (same seed, no step taken) to
    <output_dir>/checkpoint.pth: the random-initialisation reference a trained run is compared with."""
    cfg = dataclasses.replace(cfg, resume=False, export_official=False)
    validate(cfg)
    context = distributed.setup(cfg.device)
    try:
        trainer = Trainer(cfg, context)
        if context.is_main:
            trainer.output_dir.mkdir(parents=True, exist_ok=True)
        trainer._save(numbered=False)
        return trainer.checkpoint_path
    finally:
        distributed.teardown(context)


# --- the model and its update ---------------------------------------------------------------------


def pair_config(cfg: TrainConfig) -> PairConfig:
    lambda1, lambda2 = resolved_lambdas(cfg)
    return PairConfig(
        out_dim=cfg.out_dim, mlp_hidden_dim=cfg.mlp_hidden_dim, mlp_bottleneck_dim=cfg.mlp_bottleneck_dim,
        mlp_bn=cfg.mlp_bn,
        thead_depth=cfg.thead_depth, thead_dim=cfg.thead_dim, thead_heads=cfg.thead_heads,
        thead_l2norm=cfg.thead_l2norm, mode=cfg.mode,
        losses=cfg.losses, lambda1=lambda1, lambda2=lambda2, n_local=cfg.n_local,
        warmup_teacher_temp=cfg.warmup_teacher_temp, teacher_temp=cfg.teacher_temp,
        warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,
        cnn_self_warmup_epochs=None if cfg.paper_temperature else cfg.cnn_self_warmup_teacher_temp_epochs,
        epochs=cfg.epochs, vit_drop_path=cfg.drop_path,
    )


def build_pair(specs, cfg: TrainConfig) -> MokdPair | PeerPair:
    """MOKD's pair, or another method's (mokd_train.methods) behind the same interface."""
    return MokdPair(*specs, pair_config(cfg)) if cfg.method == "mokd" else build_peer_pair(specs, cfg)


def update_model(pair: MokdPair | PeerPair, index: int, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None = None, *, clip_grad: float, hold_last_layers: bool) -> None:
    """Model `index`'s update from its gradients, which are then freed: per-tensor clipping of the student's
    (unscaled, fp16) gradients, the heads' last layers held (`hold_last_layers`: the first epoch(s) of the
    recipe), the optimizer step."""
    def prepare_gradients() -> None:
        if clip_grad > 0:
            clip_gradients_per_tensor(list(pair.students[index].parameters()), clip_grad)
        if hold_last_layers:
            for param in pair.last_layer_parameters(index):
                param.grad = None

    optimizer_step(optimizer, scaler, before_step=prepare_gradients)


# --- the trainer ----------------------------------------------------------------------------------


class Trainer:
    """Builds everything for one run and drives the epochs; one instance per process."""

    def __init__(self, cfg: TrainConfig, context: DistContext) -> None:
        lambda1, lambda2 = resolved_lambdas(cfg)
        self.cfg = dataclasses.replace(cfg, lambda1=lambda1, lambda2=lambda2)
        self.context = context
        self.output_dir = Path(cfg.output_dir)
        self.device = context.device
        self.dtype = amp_dtype(cfg.amp, self.device)
        if cfg.batch_size % context.world_size:
            raise MokdError(f"batch size {cfg.batch_size} is global and must divide evenly over "
                            f"{context.world_size} processes: choose a multiple of {context.world_size}")
        self.rank_batch = cfg.batch_size // context.world_size
        self.resources = apply_resources(self.device.type, cfg.num_workers)
        found = self._find_resume_state()
        init_source = (checkpointing.read_init_source(Path(cfg.init_from), arch_specs(cfg))
                       if cfg.init_from and found is None else None)
        self.cfg = dataclasses.replace(self.cfg, position_size=self._position_size(found, init_source))
        self.specs = arch_specs(self.cfg)
        if found is not None:
            checkpointing.check_compatible(found[0], found[1], self.specs, self.cfg.mode, self.cfg.method)
        _seed_everything(cfg.seed)

        data_spec = parse_data_spec(cfg.data)
        dataset = open_dataset(data_spec, "train", MultiCropAugmentation(multicrop_config(cfg, data_spec)),
                               skip_bad_images=cfg.skip_bad_images)
        self.crops = SeededCrops(dataset, cfg.seed)
        samples = EpochShardSampler.samples_per_rank(len(dataset), context.world_size)
        self.steps_per_epoch = samples // self.rank_batch
        if self.steps_per_epoch < 1:
            raise MokdError(f"{data_spec.text} has {len(dataset)} training images, fewer than one global batch "
                            f"of {cfg.batch_size}: lower --batch-size")
        self.schedules = build_schedules(self.cfg, self.steps_per_epoch)

        self.pair = build_pair(self.specs, self.cfg)
        self.resumed_from = found[1] if found is not None else None
        if init_source is not None:
            checkpointing.initialise_from(init_source, self.pair, self.log)
        elif cfg.init_from:
            self.log(f"--init-from {cfg.init_from} ignored: resuming the run in {self.output_dir}")
        self.pair.to(self.device)
        if context.distributed:
            for network in [*self.pair.students, *self.pair.teachers]:  # DoGo has no teachers
                synchronise_batchnorm(network, context)
            self.pair.wrap_students(ddp_wrapper(context, self.pair.has_unused_parameters))
        self.optimizers = [build_optimizer(self.pair, index, cnn_optimizer=self.cfg.cnn_optimizer)
                           for index in (0, 1)]
        self.scalers = [make_scaler(self.dtype) for _ in (0, 1)]
        self.progress = Progress()
        if context.is_main:
            checkpointing.remove_stale_temporaries(self.output_dir, self.log)
        if found is not None:
            state, path = found
            self.progress = checkpointing.restore(state, path, self.pair, self.optimizers, self.scalers)
            self.log(f"resumed from {path}: {self.progress.epoch} epochs + {self.progress.step_in_epoch} steps done "
                     f"({self.progress.global_step} steps in total)")
            if context.is_main:
                checkpointing.set_aside_unreadable_latest(self.output_dir, path, self.log)
                checkpointing.write_missing_numbered_copy(self.output_dir, state, save_every=cfg.save_every,
                                                          epochs=cfg.epochs, official=cfg.export_official,
                                                          log=self.log)
        elif cfg.resume:
            self.log(f"nothing to resume in {self.output_dir} (no checkpoint there): starting a new run")
        self.last_stats: dict[str, float] = {}
        self.last_monitor: dict[str, float] = {}
        self.checkpoint_path: Path | None = None
        self.step_seconds: list[float] = []
        self.replaced_images = 0  # samples whose unreadable image was replaced (--skip-bad-images), all ranks
        self.board: TensorBoardLog | None = None

    # -- helpers --

    def log(self, message: str) -> None:
        if self.context.is_main:
            tqdm.write(message)

    def _find_resume_state(self) -> tuple[dict[str, Any], Path] | None:
        return checkpointing.find_resume_state(self.output_dir, self.log) if self.cfg.resume else None

    def _position_size(self, found: tuple[dict[str, Any], Path] | None,
                       init_source: checkpointing.InitSource | None) -> int | None:
        """The configured position_size; else the resumed run's (same shapes again); else the size of the grids
        stored in --init-from (an official checkpoint: 224 px, resized at every forward); else None (img_size)."""
        if self.cfg.position_size is not None:
            return self.cfg.position_size
        if found is not None:
            return found[0]["config"].get("position_size")
        if init_source is None:
            return None
        size = checkpointing.stored_position_size(init_source, arch_specs(self.cfg))
        if size is not None:
            self.log(f"position_size = {size}: the position grids stored in {init_source.path} are built for {size} px "
                     f"images; they are kept at that size and resized at every forward for {self.cfg.img_size} / "
                     f"{self.cfg.local_size} px crops, as the official code does")
        return size

    def _autocast(self) -> ContextManager:
        return autocast_context(self.device, self.dtype)

    def _loader(self, epoch: int, skip_batches: int) -> DataLoader:
        sampler = EpochShardSampler(self.crops, self.context, self.cfg.seed, epoch, skip=skip_batches * self.rank_batch)
        # An explicit generator keeps the DataLoader from drawing its base seed from the global RNG,
        # which would shift drop-path masks between an interrupted run and an uninterrupted one.
        return DataLoader(self.crops, batch_size=self.rank_batch, sampler=sampler, num_workers=self.resources.workers,
                          pin_memory=self.device.type == "cuda", drop_last=True, generator=torch.Generator())

    def _done(self) -> bool:
        cfg, progress = self.cfg, self.progress
        return progress.epoch >= cfg.epochs or (cfg.max_steps > 0 and progress.global_step >= cfg.max_steps)

    # -- the run --

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.context.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.log(describe(cfg))
            self.log(f"  runtime: {self.context.world_size} process(es) on {self.device}, autocast "
                     f"{self.dtype or 'off'}, {self.rank_batch} images per process and step, "
                     f"{self.resources.workers} loader worker(s) + {self.resources.threads} torch thread(s) per "
                     f"process, "
                     f"{self.steps_per_epoch} steps per epoch")
            write_json(self.output_dir / CONFIG_NAME, cfg.to_dict())
            self.journal = JsonLinesLog(self.output_dir / LOG_NAME, self._resumed_step())
            self.board = TensorBoardLog(self.output_dir, self._resumed_step()) if cfg.tensorboard else None
        self.knn = self._online_knn()
        start = time.perf_counter()
        try:
            while not self._done():
                self._train_epoch()
            if self.knn is not None and self.knn.last_step() != self.progress.global_step:
                self._evaluate_knn(epoch_seconds=None)  # a run stopped by max_steps mid-epoch
        finally:
            if self.board is not None:
                self.board.close()
        total = time.perf_counter() - start
        if self.checkpoint_path is None:
            self.checkpoint_path = self.resumed_from
        if self.context.is_main and cfg.curves:
            self._draw_curves()
        self.context.barrier()  # every rank leaves the process group together, after rank 0's last writes
        return self._summary(total)

    def _resumed_step(self) -> int | None:
        return self.progress.global_step if self.resumed_from is not None else None

    def _online_knn(self) -> OnlineKnn | None:
        if not self.cfg.knn_every:
            return None
        return OnlineKnn(self.cfg.knn_data or self.cfg.data, self.cfg.img_size, self.output_dir,
                         batch_size=max(self.rank_batch, 64), num_workers=self.resources.workers,
                         device=self.cfg.device, resumed_step=self._resumed_step())

    def _record(self, record: dict[str, Any]) -> None:
        """One log record to log.jsonl and, with --tensorboard, to TensorBoard (rank 0 only)."""
        self.journal.write(record)
        if self.board is not None:
            self.board.write(record)

    def _evaluate_knn(self, epoch_seconds: float | None) -> None:
        """Both teachers' k-NN (the students for a method without teachers); its cost is logged as a share of
        the epoch it follows."""
        networks = self.pair.teachers if len(self.pair.teachers) else self.pair.students
        named = [(f"teacher{index + 1}" if len(self.pair.teachers) else f"student{index + 1}", network.backbone,
                  self.specs[index]) for index, network in enumerate(networks)]
        record = self.knn.evaluate(named, step=self.progress.global_step, epoch=self.progress.epoch,
                                   is_main=self.context.is_main)
        if record is None:
            return
        share = record["seconds"] / (record["seconds"] + epoch_seconds) if epoch_seconds else None
        self._record({"kind": "knn", **record, "epoch_share": round(share, 4) if share is not None else None})
        accuracies = ", ".join(f"{name} top-1 {record[name]['top1']:.2f}" for name, _, _ in named)
        cost = f" = {100 * share:.1f} % of the epoch" if share is not None else ""
        self.log(f"online k-NN (k = {record['k']}, {self.knn.data.spec.text}) after step {record['step']}: "
                 f"{accuracies}; {record['seconds']:.1f} s{cost}")

    def _draw_curves(self) -> None:
        from mokd_analysis.curves import draw_curves

        paths = draw_curves([self.output_dir], self.output_dir / "curves")
        self.log(f"curves: {paths['png']}")

    def _train_epoch(self) -> None:
        cfg, progress = self.cfg, self.progress
        epoch = progress.epoch
        loader = self._loader(epoch, progress.step_in_epoch)
        bar = tqdm(total=self.steps_per_epoch, initial=progress.step_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not self.context.is_main, dynamic_ncols=True, leave=False)
        sums: dict[str, float] = {}
        monitor_sums: dict[str, float] = {}
        steps_here = 0
        replaced = 0  # this rank's samples whose unreadable image was replaced
        epoch_start = tick = time.perf_counter()
        for crops, replaced_in_batch in loader:
            replaced += int(replaced_in_batch.sum())
            stats = self._step(crops)
            progress.step_in_epoch += 1
            progress.global_step += 1
            now = time.perf_counter()
            self.step_seconds.append(now - tick)
            images_per_s = cfg.batch_size / (now - tick)
            tick = now
            steps_here += 1
            for name, value in stats.items():
                sums[name] = sums.get(name, 0.0) + value
            for name, value in self.last_monitor.items():
                monitor_sums[name] = monitor_sums.get(name, 0.0) + value
            self._report_step(bar, stats, images_per_s)
            if progress.step_in_epoch == self.steps_per_epoch:
                progress.epoch += 1
                progress.step_in_epoch = 0
                epoch_seconds = time.perf_counter() - epoch_start
                self._report_epoch(sums, monitor_sums, steps_here, epoch_seconds, self._count_replaced(replaced))
                if self.knn is not None and online_knn.due(progress.epoch, cfg.knn_every, cfg.epochs):
                    self._evaluate_knn(epoch_seconds)
                self._save(numbered=progress.epoch % cfg.save_every == 0 or progress.epoch == cfg.epochs)
            elif self._done() or self._periodic_save_due():
                self._save(numbered=False)
            if self._done():
                break
        bar.close()
        if progress.step_in_epoch:  # stopped inside the epoch (--max-steps): its replacements count too
            self._count_replaced(replaced)

    def _count_replaced(self, replaced_on_this_rank: int) -> int:
        """The replaced images of every rank (one all-reduce; every rank calls it), added to the run's total."""
        replaced = int(self.context.sum(torch.tensor([replaced_on_this_rank], dtype=torch.float64))[0])
        self.replaced_images += replaced
        return replaced

    def _periodic_save_due(self) -> bool:
        every = self.cfg.checkpoint_every_steps
        return every > 0 and self.progress.global_step % every == 0

    def _set_hyperparameters(self, iteration: int) -> None:
        if isinstance(self.pair, PeerPair) and self.pair.own_recipe:
            self.pair.set_hyperparameters(self.optimizers, iteration, self.steps_per_epoch)
            return
        for index, optimizer in enumerate(self.optimizers):
            for group in optimizer.param_groups:
                family = schedule_family(self.pair, index, group["part"])
                group["lr"] = float(self.schedules.lr[family][iteration])
                decay = float(self.schedules.weight_decay[family][iteration])
                group["weight_decay"] = decay if group["regularized"] else 0.0

    def _step(self, crops: list[torch.Tensor]) -> dict[str, float]:
        progress, pair = self.progress, self.pair
        epoch = progress.epoch
        iteration = epoch * self.steps_per_epoch + progress.step_in_epoch
        self._set_hyperparameters(iteration)
        crops = [crop.to(self.device, non_blocking=True) for crop in crops]
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            try:
                _, _, stats = pair.compute_losses(crops, epoch, backward=self._backward_and_step)
            except NonFiniteLossError as error:
                raise self._diverged(f"loss term {error.term} became non-finite at step {progress.global_step + 1} "
                                     f"(epoch {epoch + 1})") from None
        pair.update_teachers(float(self.schedules.momentum[iteration]))
        monitor = getattr(pair, "monitor", {})  # the collapse monitor is MOKD's (peer methods log none)
        if self.context.distributed:  # one all-reduce for the losses and the monitor
            names, monitored = list(stats), list(monitor)
            values = [stats[name] for name in names] + [monitor[name] for name in monitored]
            means = (self.context.sum(torch.tensor(values, dtype=torch.float64)) / self.context.world_size).tolist()
            stats, monitor = dict(zip(names, means)), dict(zip(monitored, means[len(names):]))
        self.last_stats = stats
        self.last_monitor = monitor
        return stats

    def _backward_and_step(self, losses: dict[int, torch.Tensor]) -> None:
        """Back-propagate the given models' (finite) losses, each scaled by its own model's GradScaler (fp16),
        outside autocast, then step those models. The pair calls this once per model (MOKD: L1 before student 2
        runs, which reads only teacher 1, so the update is the same as stepping both at the end, and model 1's
        gradients are freed before model 2's are allocated) or once for both (peer methods)."""
        scaled = [scale_loss(loss, self.scalers[index]) for index, loss in losses.items()]
        with torch.autocast(self.device.type, enabled=False):
            sum(scaled).backward()
        for index in losses:
            update_model(self.pair, index, self.optimizers[index], self.scalers[index], clip_grad=self.cfg.clip_grad,
                         hold_last_layers=self.progress.epoch < self.cfg.freeze_last_layer)

    def _report_step(self, bar: tqdm, stats: dict[str, float], images_per_s: float) -> None:
        cfg, progress = self.cfg, self.progress
        bar.update(1)
        if not self.context.is_main:
            return
        epoch = progress.epoch  # called before an epoch end advances it: step_in_epoch is 1..steps_per_epoch
        iteration = epoch * self.steps_per_epoch + progress.step_in_epoch - 1
        lr = {f"{index + 1}": self.optimizers[index].param_groups[0]["lr"] for index in (0, 1)}
        momentum = float(self.schedules.momentum[iteration])
        bar.set_postfix({**{name: f"{value:.3f}" for name, value in stats.items()},
                         "lr1": f"{lr['1']:.2e}", "lr2": f"{lr['2']:.2e}", "m": f"{momentum:.4f}",
                         "img/s": f"{images_per_s:.1f}"})
        if progress.global_step % cfg.log_every:
            return
        temps = self.pair.teacher_temperatures(epoch)
        self._record({
            "kind": "step", "step": progress.global_step, "epoch": epoch,
            "step_in_epoch": progress.step_in_epoch, "losses": stats,
            "lr": {**lr, **{f"{index + 1}_thead": _group_value(self.optimizers[index], "thead", "lr")
                            for index in (0, 1)}},
            "weight_decay": {f"{index + 1}": _group_value(self.optimizers[index], "main", "weight_decay")
                             for index in (0, 1)},
            "momentum": momentum, "teacher_temp": {name: temps[name] for name in stats if name in temps},
            "images_per_s": round(images_per_s, 2),
        })

    def _report_epoch(self, sums: dict[str, float], monitor_sums: dict[str, float], steps: int,
                      seconds: float, replaced: int) -> None:
        """Epoch means of the losses and of the collapse monitor, with a warning for a collapsing model, and the
        count of unreadable images replaced (--skip-bad-images), with a warning when they are many."""
        if not self.context.is_main:
            return
        means = {name: value / steps for name, value in sums.items()}
        monitor = {name: value / steps for name, value in monitor_sums.items()}
        summary = ", ".join(f"{name} {value:.4f}" for name, value in means.items())
        self.log(f"epoch {self.progress.epoch}/{self.cfg.epochs} done in {seconds:.1f} s: {summary}")
        warnings = []
        for index in (1, 2):
            own = {name: monitor[f"{name}{index}"] for name in MONITORED if f"{name}{index}" in monitor}
            if own:
                self.log(f"  collapse monitor, model {index} ({self.specs[index - 1].name}): "
                         f"teacher entropy {own['teacher_entropy']:.3f} of ln K {math.log(self.cfg.out_dim):.3f}, "
                         f"KL(teacher || student) {own['kl']:.3f}, student pairwise cosine "
                         f"{own.get('student_cos', float('nan')):.3f}")
                warnings += diagnose(own, f"model {index} ({self.specs[index - 1].name})", self.cfg.out_dim)
        replaced_line, replaced_warning = replaced_images_report(replaced, steps * self.cfg.batch_size)
        if replaced_line:
            self.log(replaced_line)
        warnings += [replaced_warning] if replaced_warning else []
        for warning in warnings:
            self.log(f"warning: {warning}")
        self._record({"kind": "epoch", "step": self.progress.global_step, "epoch": self.progress.epoch,
                      "steps": steps, "mean_losses": means, "monitor": monitor, "warnings": warnings,
                      "replaced_images": replaced,
                      "seconds": round(seconds, 3), "images_per_s": round(steps * self.cfg.batch_size / seconds, 2)})

    def _diverged(self, what: str) -> MokdError:
        """The stop message of a diverged run, naming the checkpoint that really resumes it."""
        last_good = self.checkpoint_path or self.resumed_from
        if last_good is None:
            return MokdError(f"{what}; training stopped before any checkpoint was written: lower the learning rate "
                             f"(--lr-cnn / --lr-vit) and start again")
        return MokdError(f"{what}; training stopped and the last good checkpoint {last_good} was left untouched: "
                         f"lower the learning rate (--lr-cnn / --lr-vit) and rerun the same command to resume from it")

    def _save(self, *, numbered: bool) -> None:
        # Every rank checks (the weights are replicated), so all stop together and nothing non-finite is saved:
        # weights can turn NaN/inf one step before any loss does.
        state = checkpointing.native_state(self.pair, self.optimizers, self.scalers, self.progress,
                                           self.cfg.to_dict())
        poisoned = checkpointing.non_finite_networks(state)
        if poisoned:
            raise self._diverged(f"the weights of {', '.join(poisoned)} became non-finite at step "
                                 f"{self.progress.global_step} (epoch {self.progress.epoch + 1}) before any loss did")
        if self.context.is_main:
            self.checkpoint_path = checkpointing.save_checkpoint(self.output_dir, state, numbered=numbered,
                                                                 official=self.cfg.export_official)
        else:
            self.checkpoint_path = self.output_dir / checkpointing.LATEST
        self.context.barrier()

    def _summary(self, total_seconds: float) -> dict[str, Any]:
        steps = self.step_seconds
        official = None
        if self.cfg.export_official:
            official = str(checkpointing.official_path(self.output_dir, self.specs))
        return {
            "output_dir": str(self.output_dir),
            "checkpoint": str(self.checkpoint_path) if self.checkpoint_path else None,
            "official_checkpoint": official,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "epochs_done": self.progress.epoch,
            "step_in_epoch": self.progress.step_in_epoch,
            "global_step": self.progress.global_step,
            "final_losses": self.last_stats,
            "replaced_images": self.replaced_images,
            "rank": self.context.rank,  # callers print the summary on rank 0 only
            "world_size": self.context.world_size,
            "device": str(self.device),
            "timings": {
                "total_s": round(total_seconds, 3),
                "steps": len(steps),
                "mean_step_s": round(sum(steps) / len(steps), 4) if steps else None,
                "images_per_s": round(len(steps) * self.cfg.batch_size / sum(steps), 2) if steps else None,
            },
        }


def _group_value(optimizer: torch.optim.Optimizer, part: str, key: str) -> float | None:
    """`key` of the first (regularized) group of `part`, None when the model has no such group."""
    for group in optimizer.param_groups:
        if group["part"] == part:
            return group[key]
    return None


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
