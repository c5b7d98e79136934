"""Benchmark: one MOKD pair step against one step of each model trained alone (DINO) and one step of
each other online-distillation method (DoGo, MCL and the dino+ adaptations), same pair and batch.

Usage: python benchmarks/bench_train_step.py [--steps 5 --warmup 2 --setups tiny tiny@16 r18-vit_t@64 r50-vit_s@224
       --batch-size N --rounds R --methods ...]

The other methods run the engine's step on their own pair module (`mokd_train.methods`): DoGo and MCL on the
two global crops only (their recipes have no local crops), the dino+ adaptations on all crops like MOKD.

"Alone" uses the same engine pieces with one model: its student network (backbone + MLP-Head, no
T-Head), its EMA teacher, DINO's self-distillation loss `sm` with its center, the same optimizer
(SGD for a ResNet, AdamW for a ViT), per-tensor clipping and EMA update. The pair step is the
engine's: all 8 terms, each model's loss back-propagated and its optimizer stepped before the other
student runs, two EMA updates. Crops are
random tensors (data loading is the same for both and excluded).

Each measurement runs in its own spawned process and reports the fastest of its timed steps (the
least disturbed by other processes on a shared machine; the median is printed too) and the peak
resident memory above the resident size just before the models are built (`ru_maxrss`, which sees
every torch allocation on CPU; on CUDA the peak of `torch.cuda.max_memory_allocated`). The peak is split into
the state held between steps, counted tensor by tensor (parameters, buffers, optimizer states, and gradients
where a step leaves them: the DINO steps keep theirs until the next step, as DINO does, while the engine frees
each model's right after its update; MOKD's T-Heads add their state by design), and the rest ("act.":
activations, temporaries and, for MOKD, the gradients of the model being updated). The
GFLOP column counts one step's matmul/conv/attention work with torch's FlopCounterMode: its ratio is the
cost MOKD adds by construction, the floor of the time ratio.
Paper Table S3 (8 V100, 100 ImageNet epochs): DINO R50 97 h + DINO ViT-S 94 h = 191 h vs MOKD
R50-ViT-S 122 h (0.64x the sum); memory 6.4 + 6.3 = 12.7 GB vs 13.5 GB (1.06x the sum).
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mokd.core.atomic import write_json
from mokd.core.training_loop import clip_gradients_per_tensor
from mokd_train.config import TrainConfig, arch_specs, resolve_config
from mokd_train.engine import pair_config, update_model
from mokd_train.optim import build_optimizer, make_optimizer
from mokd_train.methods import FAITHFUL_PEERS, METHODS, method_label
from mokd_train.methods.factory import build_peer_pair
from mokd_train.methods.base import PeerPair
from mokd_train.losses import Centers, batch_center, distillation_loss
from mokd_train.pair import MokdPair, build_network, ema_update, thead_width

# name -> (preset, overrides, batch size). `tiny` is the preset (32 px), `tiny@16` the crops `mokd-eval demo`
# trains on; then the paper's recipe (8 locals, K = 65536, 2048-wide MLP) at 64 px with ImageNet-stem R18 and
# 16 px-patch ViT-T; last the paper's pair at the paper's crop sizes (224/96 px, 8 locals), where the backbones
# dominate the step as they do on GPU (batch 2 on CPU by default; --batch-size 4 fits too).
SETUPS = {
    "tiny": ("tiny", {}, 32),
    "tiny@16": ("tiny", {"img_size": 16, "local_size": 8}, 32),
    "r18-vit_t@64": ("tiny", {"arch1": "r18", "arch2": "vit_t", "patch_size": 16, "img_size": 64, "local_size": 32,
                              "n_local": 8, "out_dim": 65536, "mlp_hidden_dim": 2048, "mlp_bottleneck_dim": 256,
                              "mlp_bn": False}, 32),
    "r50-vit_s@224": ("r50-vit_s", {}, 2),
}


def setup_config(setup: str, batch_size: int | None) -> TrainConfig:
    preset, overrides, default_batch = SETUPS[setup]
    return resolve_config(preset, None, {**overrides, "output_dir": "unused",
                                         "batch_size": batch_size or default_batch})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--batch-size", type=int, default=None, help="default: per setup (32, 32, 32, 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (fastest and median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every variant this many times, alternating the order (a shared machine's "
                             "load drifts); the fastest round counts")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="*", default=[m for m in METHODS if m != "mokd"],
                        choices=[m for m in METHODS if m != "mokd"], help="other methods to time next to MOKD")
    parser.add_argument("--json", type=Path, help="also write the measurements and ratios here")
    return parser.parse_args()


@dataclass
class Measurement:
    step_seconds: float  # fastest timed step
    median_seconds: float
    peak_mb: float
    static_mb: float  # held between steps (`state_mb`): parameters, gradients, buffers, optimizer states
    gflop: float  # matmul/conv/attention FLOPs of one step, forward and backward (torch's FlopCounterMode)

    @property
    def activation_mb(self) -> float:
        """What a step adds on top of the static memory at its peak: activations and temporaries."""
        return self.peak_mb - self.static_mb


def random_crops(config: TrainConfig, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sizes = [config.img_size] * 2 + [config.local_size] * config.n_local
    return [torch.randn(config.batch_size, 3, size, size, generator=generator).to(device) for size in sizes]


def engine_step(pair: MokdPair | PeerPair, optimizers: list[torch.optim.Optimizer], config: TrainConfig):
    """The engine's optimisation step without GradScalers: each model's backward and update as soon as its
    loss exists (MOKD: model 1 before student 2 runs; peer methods: both at once), then the EMA update."""

    def backward_and_step(losses: dict[int, torch.Tensor]) -> None:
        sum(losses.values()).backward()
        for index in losses:
            update_model(pair, index, optimizers[index], clip_grad=config.clip_grad, hold_last_layers=False)

    def step(crops: list[torch.Tensor]) -> None:
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        pair.compute_losses(crops[:2 + config.n_local], epoch=0, backward=backward_and_step)
        pair.update_teachers(0.996)

    return step


def pair_step(config: TrainConfig, device: torch.device):
    """The engine's optimisation step for the pair (all terms)."""
    pair = MokdPair(*arch_specs(config), pair_config(config)).to(device)
    optimizers = [build_optimizer(pair, index, cnn_optimizer=config.cnn_optimizer) for index in (0, 1)]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = 1e-4
    return engine_step(pair, optimizers, config), [pair], optimizers


def peer_config(setup: str, method: str, batch_size: int | None) -> TrainConfig:
    """The setup for another method; DoGo and MCL train on the two global crops only."""
    preset, overrides, default_batch = SETUPS[setup]
    return resolve_config(preset, None, {**overrides, "method": method, "output_dir": "unused",
                                         "batch_size": batch_size or default_batch,
                                         **({"n_local": 0} if method in FAITHFUL_PEERS else {})})


def peer_step(config: TrainConfig, device: torch.device):
    """The engine's step for another method: its losses, one combined backward, its optimizers, its EMA."""
    pair = build_peer_pair(arch_specs(config), config).to(device)
    optimizers = [build_optimizer(pair, index, cnn_optimizer=config.cnn_optimizer) for index in (0, 1)]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = 1e-4
    return engine_step(pair, optimizers, config), [pair], optimizers


def single_step(config: TrainConfig, index: int, device: torch.device):
    """DINO on model `index` alone, built from the pair's pieces (no T-Head, no partner)."""
    specs = arch_specs(config)
    spec, settings = specs[index], pair_config(config)
    dim, heads = thead_width(*specs, settings)
    student = build_network(spec, settings, dim, heads, drop_path_rate=settings.vit_drop_path if spec.is_vit else 0.0)
    student.transhead = None
    student.to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)
    centers = Centers(["sm"], settings.out_dim, settings.center_momentum).to(device)
    params = [param for param in student.parameters() if param.requires_grad]
    optimizer = make_optimizer(params, vit=spec.is_vit, cnn_optimizer=config.cnn_optimizer)
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    only_mlp = frozenset({"mlp"})

    def step(crops: list[torch.Tensor]) -> None:
        global_crops, local_crops = torch.cat(crops[:2]), torch.cat(crops[2:]) if len(crops) > 2 else None
        student_logits = student(global_crops, local_crops, outputs=only_mlp)["mlp"]
        with torch.no_grad():
            teacher_logits = teacher.head(teacher.features(global_crops)[0])
        loss = distillation_loss(student_logits, teacher_logits, centers["sm"], settings.warmup_teacher_temp,
                                 settings.student_temp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients_per_tensor(params, config.clip_grad)
        optimizer.step()
        centers.update({"sm": batch_center(teacher_logits)})
        ema_update([student], [teacher], 0.996)

    return step, [student, teacher, centers], [optimizer]


def state_mb(modules: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]) -> float:
    """Memory held between steps, counted tensor by tensor: parameters, the gradients a step leaves, buffers
    (teachers and centers included) and optimizer states. What a step adds on top of it is activations,
    temporaries and any gradients freed before the step ends."""
    tensors = [tensor for module in modules for tensor in (*module.parameters(), *module.buffers())]
    tensors += [param.grad for module in modules for param in module.parameters() if param.grad is not None]
    tensors += [value for optimizer in optimizers for state in optimizer.state.values()
                for value in state.values() if isinstance(value, torch.Tensor)]
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}
    return sum(storages.values()) / 2**20


def resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def measure(setup: str, variant: str, args: argparse.Namespace) -> Measurement:
    """Runs in a fresh process: build the variant, warm up, time `args.steps` steps."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = setup_config(setup, args.batch_size)
    crops = random_crops(config, device)
    baseline = resident_mb()
    if variant == "mokd":
        step, modules, optimizers = pair_step(config, device)
    elif variant in METHODS:
        step, modules, optimizers = peer_step(peer_config(setup, variant, args.batch_size), device)
    else:
        step, modules, optimizers = single_step(config, int(variant[-1]) - 1, device)
    with FlopCounterMode(display=False) as flops:  # an extra untimed step, counted
        step(crops)
    times = []
    for iteration in range(args.warmup + args.steps):
        start = time.perf_counter()
        step(crops)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if iteration >= args.warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    return Measurement(min(times), statistics.median(times), peak, state_mb(modules, optimizers),
                       flops.get_total_flops() / 1e9)


def main() -> None:
    args = parse_args()
    context = get_context("spawn")
    print(f"{args.batch_size or 'per-setup'} images per step, {args.warmup} warm-up + {args.steps} timed steps, "
          f"{args.threads} threads, {args.device}")
    print(f"{'setup':<14} {'step':<30} {'s/step':>8} {'median':>8} {'peak MB':>9} {'state MB':>9} "
          f"{'act. MB':>8} {'GFLOP':>8}")
    report: dict = {"config": {key: str(value) for key, value in vars(args).items()}, "setups": {}}
    for setup in args.setups:
        config = setup_config(setup, args.batch_size)
        names = [spec.name for spec in arch_specs(config)]
        variants = ["alone1", "alone2", "mokd", *args.methods]
        results: dict[str, Measurement] = {}
        for round_index in range(args.rounds):
            for variant in variants if round_index % 2 == 0 else reversed(variants):
                with ProcessPoolExecutor(1, mp_context=context) as pool:
                    measured = pool.submit(measure, setup, variant, args).result()
                if variant not in results or measured.step_seconds < results[variant].step_seconds:
                    results[variant] = measured
        results = {variant: results[variant] for variant in variants}
        labels = {"alone1": f"{names[0]} alone (DINO)", "alone2": f"{names[1]} alone (DINO)",
                  "mokd": f"MOKD {names[0]}-{names[1]}"}
        labels.update({method: f"{method_label(method)}" + (" 2 crops" if method in FAITHFUL_PEERS else "")
                       for method in args.methods})
        for variant, result in results.items():
            print(f"{setup:<14} {labels[variant]:<30} {result.step_seconds:>8.3f} {result.median_seconds:>8.3f} "
                  f"{result.peak_mb:>9.0f} {result.static_mb:>9.0f} {result.activation_mb:>8.0f} "
                  f"{result.gflop:>8.1f}  (batch {config.batch_size})")
        alone = (results["alone1"], results["alone2"])

        def ratio(variant: str, field: str) -> str:
            return f"{getattr(results[variant], field) / sum(getattr(one, field) for one in alone):.2f}x"

        report["setups"][setup] = {
            "batch_size": config.batch_size,
            "steps": {labels[variant]: {**asdict(result), "activation_mb": result.activation_mb}
                      for variant, result in results.items()},
            "time_over_sum_of_alone": {variant: results[variant].step_seconds
                                       / sum(one.step_seconds for one in alone) for variant in ("mokd", *args.methods)}}
        for variant in ("mokd", *args.methods):
            name = "MOKD" if variant == "mokd" else method_label(variant).split(" ")[0]
            print(f"{setup:<14} {name + ' / sum of alone':<30} {ratio(variant, 'step_seconds'):>8} {'':>8} "
                  f"{ratio(variant, 'peak_mb'):>9} {ratio(variant, 'static_mb'):>9} "
                  f"{ratio(variant, 'activation_mb'):>8} {ratio(variant, 'gflop'):>8}")
    print("paper Table S3 (R50-ViT-S, 8 V100): time 0.64x the sum (122 h vs 97 + 94 h), "
          "memory 1.06x the sum (13.5 GB vs 6.4 + 6.3 GB)")
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
