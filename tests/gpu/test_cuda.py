"""Every CUDA path against the CPU path on the same inputs (marker `cuda`; skipped with the reason where torch sees
no GPU, see conftest). None of these has run yet: this project is developed on CPU machines. `make gpu-check` runs
them first on a GPU machine.

The CPU tests at the end run here: they check what the CUDA comparisons rely on (a training run that repeats
exactly on one device, so that a CPU-CUDA difference is the device's), with the same helpers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

import mokd.cli as cli
from mokd_analysis.attention_maps import class_token_maps
from mokd_analysis.mad_eval import measure, random_init
from checkpoint_files import make_source_backbone
from mokd.core import distributed
from mokd_eval import knn
from mokd.core.data import eval_transform, open_dataset, parse_data_spec
from mokd.core.features import extract_features
from mokd_eval.knn import knn_classify
from mokd.core.registry import ALIASES
from mokd_train.config import TrainConfig, resolve_config, validate
from mokd_train.engine import Trainer, train

pytestmark = pytest.mark.slow  # its CPU-side checks train; the CUDA comparisons are marked cuda too

# Feature tolerances, relative to each feature vector's norm. fp32 on CUDA (TF32 off) differs from CPU by summation
# order: ~1e-6 relative; 1e-4 leaves room for cuDNN's algorithm choice. bf16 keeps 8 mantissa bits
# (relative rounding 2^-8 = 0.4 % per operation), which accumulate over a network's depth to about 1 %.
FP32_FEATURE_TOLERANCE = 1e-4
BF16_FEATURE_TOLERANCE = 3e-2
# bf16 features may flip a near-tie among the k neighbours: at most this fraction of top-1 predictions may differ.
BF16_MAX_FLIPPED_PREDICTIONS = 0.03
LOSS_TOLERANCE = 1e-4


@pytest.fixture
def ieee_fp32():
    """fp32 comparisons need real fp32 on the GPU: cuDNN convolutions use TF32 by default on Ampere and later
    (10 mantissa bits, ~1e-3 relative), which would pass for a CUDA bug at these tolerances."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def relative_row_error(found: np.ndarray, reference: np.ndarray) -> float:
    """Largest ||found_i - reference_i|| / ||reference_i|| over the rows."""
    return float((np.linalg.norm(found - reference, axis=1) / np.linalg.norm(reference, axis=1)).max())


def shapes_split(split: str) -> object:
    """400 train / 100 val `shapes` images at 32 px, as evaluations read them."""
    spec = parse_data_spec("shapes:500")
    return open_dataset(spec, split, eval_transform(spec)[0])


def train_config(output_dir: Path, device: str, **overrides) -> TrainConfig:
    """The engine tests' shrunk `tiny` pair; drop-path off, whose masks come from each device's own generator. The
    second model's step runs after the first model's update, and AdamW's first step moves every weight by +-lr
    whatever its gradient's size, so a near-zero gradient whose sign differs by rounding moves a weight by 2 lr:
    at 5e-4 per 256 (as the DDP test) that stays far below the loss tolerance."""
    settings = dict(output_dir=str(output_dir), data="shapes:50", arch2="test_vit", img_size=16, local_size=8,
                    n_local=2, batch_size=8, epochs=1, warmup_epochs=0, out_dim=128, mlp_hidden_dim=64,
                    mlp_bottleneck_dim=32, num_workers=0, log_every=1, max_steps=1, drop_path=0.0,
                    warmup_teacher_temp_epochs=1, cnn_self_warmup_teacher_temp_epochs=2, lr_vit=5e-4, lr_cnn=5e-4,
                    device=device, amp="none")
    settings.update(overrides)
    return resolve_config("tiny", None, settings)


def step_losses(output_dir: Path) -> list[dict[str, float]]:
    lines = (output_dir / "log.jsonl").read_text().splitlines()
    return [record["losses"] for record in map(json.loads, lines) if record["kind"] == "step"]


def assert_losses_close(found: list[dict[str, float]], reference: list[dict[str, float]], tolerance: float) -> None:
    assert len(found) == len(reference) > 0
    for found_step, reference_step in zip(found, reference):
        assert found_step.keys() == reference_step.keys()
        for term, value in reference_step.items():
            assert found_step[term] == pytest.approx(value, rel=tolerance, abs=tolerance), term


# --- feature extraction and k-NN --------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_bf16_extraction_matches_cpu_and_gives_the_same_knn_predictions():
    """The pipeline on CUDA with `--precision bf16` against CPU fp32: features within bf16 rounding, k-NN top-1
    kept."""
    spec = ALIASES["r_tiny"]
    backbone = make_source_backbone(spec)
    train_set, val_set = shapes_split("train"), shapes_split("val")
    runs = {device: [extract_features(backbone, spec, dataset, batch_size=32, num_workers=0, device=device,
                                      precision="bf16" if device == "cuda" else "fp32")
                     for dataset in (train_set, val_set)] for device in ("cpu", "cuda")}
    for cpu_run, cuda_run in zip(runs["cpu"], runs["cuda"]):
        np.testing.assert_array_equal(cuda_run.labels, cpu_run.labels)
        assert relative_row_error(cuda_run.features, cpu_run.features) < BF16_FEATURE_TOLERANCE
    predictions = {device: knn_classify(train.features, train.labels, val.features, val.labels, num_classes=10,
                                        ks=(10,), device="cpu").predictions[10]
                   for device, (train, val) in runs.items()}
    flipped = float((predictions["cuda"] != predictions["cpu"]).mean())
    assert flipped <= BF16_MAX_FLIPPED_PREDICTIONS


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["r_tiny", "vit_t"])
def test_cuda_fp32_extraction_matches_cpu(arch, tiny_vit_spec, ieee_fp32):
    """The extractor's default fp32 (no autocast, no TF32; CNNs channels_last) on CUDA against CPU."""
    spec = ALIASES["r_tiny"] if arch == "r_tiny" else tiny_vit_spec
    backbone = make_source_backbone(spec)
    val_set = shapes_split("val")
    runs = {device: extract_features(backbone, spec, val_set, batch_size=16, num_workers=0, device=device)
            for device in ("cpu", "cuda")}
    assert runs["cuda"].features.dtype == np.float32
    np.testing.assert_array_equal(runs["cuda"].labels, runs["cpu"].labels)
    assert relative_row_error(runs["cuda"].features, runs["cpu"].features) < FP32_FEATURE_TOLERANCE


@pytest.mark.cuda
def test_faiss_gpu_search_matches_the_cpu_index():
    if not knn.faiss_has_gpu_support():
        pytest.skip("the installed faiss is CPU-only: make install FAISS=gpu (docs/gpu.md)")
    generator = np.random.default_rng(0)
    bank = generator.standard_normal((5000, 64)).astype(np.float32)
    queries = generator.standard_normal((300, 64)).astype(np.float32)
    labels = generator.integers(0, 10, 5000)
    query_labels = generator.integers(0, 10, 300)
    on_cpu, on_gpu = (knn_classify(bank, labels, queries, query_labels, num_classes=10, ks=(1, 20), device=device)
                      for device in ("cpu", "cuda"))
    for k in (1, 20):
        np.testing.assert_array_equal(on_gpu.predictions[k], on_cpu.predictions[k])
        assert on_gpu.metrics[k]["top1"] == on_cpu.metrics[k]["top1"]
    faiss = knn.faiss
    cpu_index = faiss.IndexFlatIP(64)
    resources = faiss.StandardGpuResources()  # must outlive the GPU index
    gpu_index = faiss.GpuIndexFlatIP(resources, 64)
    for index in (cpu_index, gpu_index):
        index.add(bank)
    cpu_similarities, cpu_neighbours = cpu_index.search(queries, 20)
    gpu_similarities, gpu_neighbours = gpu_index.search(queries, 20)
    np.testing.assert_array_equal(gpu_neighbours, cpu_neighbours)  # random floats: no ties
    np.testing.assert_allclose(gpu_similarities, cpu_similarities, rtol=1e-5, atol=1e-4)


# --- training steps -----------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["mokd", "independent"])
def test_cuda_fp32_training_step_matches_cpu(tmp_path, mode, ieee_fp32):
    for device in ("cpu", "cuda"):
        train(train_config(tmp_path / device, device, mode=mode))
    assert_losses_close(step_losses(tmp_path / "cuda"), step_losses(tmp_path / "cpu"), LOSS_TOLERANCE)


@pytest.mark.cuda
def test_fp16_amp_keeps_one_scaler_per_model_and_resumes_them(tmp_path):
    run = tmp_path / "amp"
    train(train_config(run, "cuda", amp="fp16", max_steps=2))
    losses = step_losses(run)
    assert all(np.isfinite(value) for step in losses for value in step.values())
    saved = torch.load(run / "checkpoint.pth", map_location="cpu", weights_only=True)
    scalers = [saved["scaler1"], saved["scaler2"]]
    assert all(state is not None and state["scale"] > 0 for state in scalers)
    # Growth trackers count the finite steps since the last scale change: 2 after 2 clean steps, unless a step
    # overflowed (the tracker restarts). A resumed third step must continue from the stored counts, not from 0.
    trackers = [state["_growth_tracker"] for state in scalers]
    train(train_config(run, "cuda", amp="fp16", max_steps=3))
    resumed = torch.load(run / "checkpoint.pth", map_location="cpu", weights_only=True)
    for index, tracker in enumerate(trackers):
        state = resumed[f"scaler{index + 1}"]
        assert state["_growth_tracker"] in (tracker + 1, 0)  # continued, or reset by an overflow in step 3
        assert state["_growth_tracker"] != 1 or tracker == 0, "the scaler state was not restored on resume"
        assert state["scale"] in (scalers[index]["scale"], scalers[index]["scale"] / 2)  # kept, or halved once
    assert len(step_losses(run)) == 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _nccl_rank(rank: int, port: int, config: TrainConfig, out_dir: Path) -> None:
    """One rank of `train`, which also writes its students' weights and batch-norm classes for the parent."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    validate(config)
    context = distributed.setup(config.device)
    try:
        trainer = Trainer(config, context)
        trainer.run()
        students = [student.module if hasattr(student, "module") else student for student in trainer.pair.students]
        torch.save({"weights": [{name: tensor.cpu() for name, tensor in student.state_dict().items()}
                                for student in students],
                    "norms": sorted({type(module).__name__ for student in students for module in student.modules()
                                     if "BatchNorm" in type(module).__name__})},
                   out_dir / f"rank{rank}.pt")
    finally:
        distributed.teardown(context)


@pytest.mark.cuda
def test_nccl_ddp_on_two_gpus_converts_batchnorm_and_keeps_ranks_identical(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    config = train_config(tmp_path / "run", "cuda", max_steps=3)
    mp.spawn(_nccl_rank, args=(_free_port(), config, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert ranks[0]["norms"] == ranks[1]["norms"] == ["SyncBatchNorm"]
    for first, second in zip(ranks[0]["weights"], ranks[1]["weights"]):
        assert first.keys() == second.keys()
        for name, tensor in first.items():
            assert torch.equal(tensor, second[name]), name
    assert len(step_losses(tmp_path / "run")) == 3


# --- evaluation commands and analyses ------------------------------------------------------------------------------


def _invoke(args: list) -> dict:
    result = CliRunner().invoke(cli.mokd_eval, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return json.loads(Path(args[args.index("--out") + 1]).read_text())


def _finite_numbers(value) -> bool:
    if isinstance(value, dict):
        return all(_finite_numbers(item) for item in value.values())
    if isinstance(value, list):
        return all(_finite_numbers(item) for item in value)
    return not isinstance(value, float) or np.isfinite(value)


@pytest.mark.cuda
@pytest.mark.parametrize("command", [["linear", "--data", "shapes:100", "--batch-size", 32, "--no-cache"],
                                     ["semisup", "--percent", 1, "--data", "digits"]])
def test_linear_probe_and_finetuning_epoch_on_cuda(tmp_path, checkpoint_factory, command):
    path, _ = checkpoint_factory.dino(ALIASES["r_tiny"])
    payload = _invoke([command[0], path, *command[1:], "--device", "cuda", "--num-workers", 0, "--epochs", 1,
                       "--out", tmp_path / "out.json"])
    for entry in payload["results"]:
        metrics = entry["metrics"][command[0]]
        assert _finite_numbers(metrics) and 0 <= metrics["top1"] <= 100


@pytest.mark.cuda
def test_c4_detector_steps_on_cuda(tmp_path):
    payload = _invoke(["coco", "--backbone", "r18", "--data", "shapes-coco:4:64", "--engine", "torchvision",
                       "--batch-size", 2, "--rois-per-image", 8, "--test-proposals", 10, "--precise-bn-iters", 1,
                       "--num-workers", 0, "--iters", 2, "--device", "cuda", "--output-dir", tmp_path / "det",
                       "--out", tmp_path / "coco.json"])
    (entry,) = payload["results"]
    assert entry["training"]["iterations_run"] == 2 and _finite_numbers(entry["metrics"]["coco"])


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["r_tiny", "vit"])
def test_mean_attention_distance_on_cuda_matches_cpu(arch, tiny_vit_spec, ieee_fp32):
    spec = ALIASES["r_tiny"] if arch == "r_tiny" else dataclasses.replace(tiny_vit_spec, depth=3)
    images = torch.stack([shapes_split("val")[index][0] for index in range(8)])
    results = {device: measure(random_init(spec, 32, seed=0), images, batch_size=4, device=torch.device(device),
                               per_block=False, renormalize=False) for device in ("cpu", "cuda")}
    assert results["cuda"][0] == results["cpu"][0]
    np.testing.assert_allclose(results["cuda"][1], results["cpu"][1], rtol=1e-4)


@pytest.mark.cuda
def test_attention_maps_on_cuda_match_cpu(tiny_vit_spec, ieee_fp32):
    spec = dataclasses.replace(tiny_vit_spec, depth=3)
    module = random_init(spec, 32, seed=0).module
    images = torch.stack([shapes_split("val")[index][0] for index in range(4)])
    on_cpu = class_token_maps(module, images, 2, spec.patch_size, torch.device("cpu"))
    on_cuda = class_token_maps(module, images, 2, spec.patch_size, torch.device("cuda"))
    np.testing.assert_allclose(on_cuda, on_cpu, rtol=1e-4, atol=1e-6)


# --- CPU: what the comparisons above rely on ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["mokd", "independent"])
def test_the_comparison_run_repeats_exactly_on_one_device(tmp_path, mode):
    """Two CPU runs of `train_config` give the same losses bit for bit, so a CPU-CUDA difference beyond float
    rounding is the device's (and the losses the CUDA test compares are those of a real step)."""
    for name in ("first", "second"):
        train(train_config(tmp_path / name, "cpu", mode=mode))
    first, second = step_losses(tmp_path / "first"), step_losses(tmp_path / "second")
    assert_losses_close(first, second, 0.0)
    assert len(first) == 1 and all(np.isfinite(value) and value != 0 for value in first[0].values())


def test_relative_row_error_against_a_direct_computation():
    reference = np.array([[3.0, 4.0], [1.0, 0.0]])
    found = np.array([[3.0, 4.5], [1.0, 0.01]])
    assert relative_row_error(found, reference) == pytest.approx(0.1)  # row 0: 0.5 / 5; row 1: 0.01 / 1
    assert relative_row_error(reference, reference) == 0.0


def test_mad_and_attention_maps_run_through_the_device_argument_on_cpu(tiny_vit_spec):
    """The CPU side of the two CUDA comparisons above: same helpers, the device passed explicitly."""
    spec = dataclasses.replace(tiny_vit_spec, depth=3)
    images = torch.stack([shapes_split("val")[index][0] for index in range(4)])
    module = random_init(spec, 32, seed=0).module
    maps = class_token_maps(module, images, 2, spec.patch_size, torch.device("cpu"))
    assert maps.shape == (4, spec.num_heads, 8, 8)
    np.testing.assert_allclose(maps.sum(axis=(2, 3)) + _cls_self_attention(module, images), 1.0, rtol=1e-5)
    names, values = measure(random_init(spec, 32, seed=0), images, batch_size=2, device=torch.device("cpu"),
                            per_block=False, renormalize=False)
    assert names == ["1", "2", "3"] and values.shape == (3, spec.num_heads) and np.all(values > 0)


def _cls_self_attention(module: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """The class token's attention on itself in block 3: what its row gives the patches is 1 minus this."""
    from mokd_analysis.attention_distance import record_attention

    captured: list[torch.Tensor] = []
    with record_attention(module, lambda _layer, attention: captured.append(attention), layers=[2]), \
            torch.inference_mode():
        module(images)
    return captured[0][:, :, 0, 0].numpy()


def test_the_sources_use_no_deprecated_amp_api():
    """`torch.cuda.amp.*` / `torch.cpu.amp.*` warn (FutureWarning) and will go: `torch.amp` / `torch.autocast`."""
    root = Path(__file__).resolve().parents[2]
    deprecated = ("torch.cuda.amp", "torch.cpu.amp", "from torch.cuda import amp")
    sources = [root / "cli.py", *(path for folder in ("mokd", "mokd_eval", "mokd_train", "analysis", "benchmarks")
                                  for path in sorted((root / folder).rglob("*.py")))]
    offenders = [f"{path.relative_to(root)}:{number}"
                 for path in sources
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if any(form in line for form in deprecated)]
    assert offenders == []
