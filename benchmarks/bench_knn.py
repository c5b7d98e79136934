"""Benchmark: mokd's k-NN (one FAISS search for all ks) against a DINO-style torch loop (one search per k).

Usage: python benchmarks/bench_knn.py [--n-train 100000 --n-test 10000 --dim 384]

Both methods classify the same random clustered features. Each runs in its own spawned process,
which loads the features from .npy files, resets the kernel's resident-memory high-water mark
(Linux /proc/self/clear_refs), runs, and reports its wall time and peak resident memory (VmHWM,
which unlike tracemalloc sees torch and FAISS allocations); "extra" is that peak minus the
resident size once the features were loaded. Further sections (feature extraction rate, ...)
are added as functions returning table rows and called from `main`.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mokd.core.atomic import save_numpy, write_json
from mokd_eval.knn import DEFAULT_KS, DEFAULT_TEMPERATURE, knn_classify

DINO_NUM_CHUNKS = 100
GENERATION_ROWS = 65536


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=100_000)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--spread", type=float, default=4.0,
                        help="per-dimension noise around unit-variance class centres; 4 overlaps the "
                             "clusters so that accuracy is well below 100%%")
    parser.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--extraction-model", default="vit_t", help="backbone for the extraction-rate section")
    parser.add_argument("--extraction-data", default="shapes:2000", help="dataset spec for the extraction section")
    parser.add_argument("--jpeg-images", type=int, default=240,
                        help="JPEGs of 500 x 375 generated for the ImageFolder extraction case (0: skip it)")
    parser.add_argument("--jpeg-model", default="r18", help="backbone of the JPEG case, at 224 px")
    parser.add_argument("--extraction-workers", type=int, default=None,
                        help="DataLoader workers of the pipeline (default: extract_features' own sizing)")
    parser.add_argument("--extraction-rounds", type=int, default=6,
                        help="pipeline runs, each between two bare forwards; the median of the paired ratios counts")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: k-NN search and extraction")
    parser.add_argument("--skip-knn", action="store_true", help="run only the extraction section")
    parser.add_argument("--skip-extraction", action="store_true", help="run only the k-NN section")
    return parser.parse_args()


def write_clustered_features(directory: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Gaussian clusters around shared random centres, saved as .npy so each child loads the same bytes."""
    generator = torch.Generator().manual_seed(args.seed)
    centres = torch.randn(args.num_classes, args.dim, generator=generator)
    paths = {}
    for split, n in (("train", args.n_train), ("test", args.n_test)):
        labels = torch.randint(0, args.num_classes, (n,), generator=generator)
        features = torch.empty(n, args.dim)
        for start in range(0, n, GENERATION_ROWS):
            rows = labels[start:start + GENERATION_ROWS]
            features[start:start + len(rows)] = centres[rows] + args.spread * torch.randn(
                len(rows), args.dim, generator=generator)
        paths[f"{split}_features"] = save_numpy(directory / f"{split}_features.npy", features.numpy())
        paths[f"{split}_labels"] = save_numpy(directory / f"{split}_labels.npy", labels.numpy())
    return paths


def dino_style_knn(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, ks: list[int],
                   temperature: float, num_classes: int, device: str = "cpu") -> dict[int, np.ndarray]:
    """DINO's loop: for EACH k, every query chunk does a full matmul, a topk and a one-hot weighted vote.

    Queries are chunked as DINO does (n_test // 100 per chunk), guarded against n_test < 100.
    Classes are ranked by a stable descending sort, the same tie rule as mokd.
    """
    bank = F.normalize(torch.from_numpy(train_x).to(device), dim=1)
    queries = F.normalize(torch.from_numpy(test_x).to(device), dim=1)
    bank_labels = torch.from_numpy(train_y).to(device)
    chunk = max(1, len(queries) // DINO_NUM_CHUNKS)
    predictions = {}
    for k in ks:
        predicted = []
        for start in range(0, len(queries), chunk):
            similarity = queries[start:start + chunk] @ bank.T
            top_sims, top_idx = similarity.topk(k, dim=1)
            one_hot = torch.zeros(top_idx.numel(), num_classes, device=device).scatter_(1, bank_labels[top_idx].view(-1, 1), 1)
            weights = (top_sims / temperature).exp()
            scores = (one_hot.view(len(top_idx), k, num_classes) * weights[:, :, None]).sum(dim=1)
            predicted.append(scores.sort(dim=1, descending=True, stable=True).indices[:, 0])
        predictions[k] = torch.cat(predicted).cpu().numpy()
    return predictions


def resident_mib(field: str) -> float:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, from /proc (in kB there)."""
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))
    return kib / 1024


def run_method(method: str, paths: dict[str, Path], args: argparse.Namespace) -> dict:
    """Child-process body: load features, reset the RSS high-water mark, time one method, read the peak."""
    torch.set_num_threads(args.threads)
    data = {name: np.load(path) for name, path in paths.items()}
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    loaded_mib = resident_mib("VmRSS")
    start = time.perf_counter()
    if method == "mokd":
        result = knn_classify(data["train_features"], data["train_labels"], data["test_features"],
                              data["test_labels"], num_classes=args.num_classes, ks=args.ks,
                              temperature=args.temperature, device=args.device)
        predictions, details = result.predictions, {"timings": result.timings}
    else:
        predictions = dino_style_knn(data["train_features"], data["train_labels"], data["test_features"],
                                     args.ks, args.temperature, args.num_classes, args.device)
        details = {}
    seconds = time.perf_counter() - start
    peak_mib = resident_mib("VmHWM")
    top1 = {k: float(100 * (pred == data["test_labels"]).mean()) for k, pred in predictions.items()}
    return {"method": method, "seconds": seconds, "peak_mib": peak_mib, "extra_mib": peak_mib - loaded_mib,
            "top1": top1, "predictions": predictions, **details}


def in_fresh_process(method: str, paths: dict[str, Path], args: argparse.Namespace) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(run_method, method, paths, args).result()


def knn_section(args: argparse.Namespace) -> list[dict]:
    """Time both k-NN methods on identical features; compare their top-1 predictions for every k."""
    with tempfile.TemporaryDirectory(prefix="bench_knn_") as directory:
        paths = write_clustered_features(Path(directory), args)
        reference = in_fresh_process("dino-style torch", paths, args)
        mokd = in_fresh_process("mokd", paths, args)
    reference_predictions, mokd_predictions = reference.pop("predictions"), mokd.pop("predictions")
    reference["differing_top1"] = {k: 0 for k in reference_predictions}
    mokd["differing_top1"] = {k: int((mokd_predictions[k] != reference_predictions[k]).sum())
                              for k in reference_predictions}
    for row in (reference, mokd):
        row["speedup"] = reference["seconds"] / row["seconds"]
    return [reference, mokd]


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'method':<18} {'wall s':>8} {'speed-up':>8} {'peak MiB':>9} {'extra MiB':>9}  top-1 identical (k: differing)")
    for row in rows:
        identical = ", ".join(f"{k}: {n}" for k, n in row["differing_top1"].items())
        print(f"{row['method']:<18} {row['seconds']:>8.2f} {row['speedup']:>7.2f}x {row['peak_mib']:>9.0f} "
              f"{row['extra_mib']:>9.0f}  {identical}")
    for row in rows:
        accuracy = ", ".join(f"k={k}: {value:.2f}%" for k, value in row["top1"].items())
        print(f"  {row['method']} top-1: {accuracy}" + (f"  timings: {row['timings']}" if "timings" in row else ""))


def write_jpeg_folder(root: Path, n_images: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> str:
    """An ImageFolder of photo-like JPEGs (gradients, edges, noise; ~100 KB each at ImageNet's typical 500 x 375),
    half in each of two classes, as the `imagefolder:` spec of it."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size[1], 0:size[0]]
    for split, count in (("train", n_images), ("val", 2)):
        for index in range(count):
            folder = root / split / f"class{index % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            channels = [127 + 100 * np.sin(rng.uniform(0.01, 0.1) * xs + rng.uniform(0.01, 0.1) * ys)
                        for _ in range(3)]
            pixels = np.stack(channels, axis=-1) + rng.normal(0, 20, (size[1], size[0], 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{index:05d}.jpg", quality=90)
    return f"imagefolder:{root}"


def bare_forward_rate(model: torch.nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
                      channels_last: bool) -> float:
    """Images/s of the backbone alone on preloaded images (on `device`, bf16 autocast on CUDA as the pipeline)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    images = images.to(device).contiguous(memory_format=memory_format)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        model(images[:batch_size])  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for begin in range(0, len(images), batch_size):
            model(images[begin:begin + batch_size])
        synchronize(device)
        return len(images) / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def extraction_case(model_name: str, data_text: str, image_size: int | None, args: argparse.Namespace) -> dict:
    """Feature extraction through the real pipeline (dataset, transform, DataLoader workers, cache off) vs the
    same backbone's fastest bare forward (contiguous or channels_last) on the same images preloaded as one tensor."""
    from mokd.core.data import eval_transform, image_side, open_dataset, parse_data_spec
    from mokd.core.distributed import choose_device
    from mokd.core.features import extract_features
    from mokd.core.registry import build_backbone, resolve_arch

    data_spec = parse_data_spec(data_text)
    side = image_side(data_spec, image_size)
    spec = resolve_arch(model_name, **({"img_size": side, "patch_size": 4} if model_name == "vit_t" and side <= 64
                                        else {"img_size": side}))
    transform, _ = eval_transform(data_spec, image_size)
    dataset = open_dataset(data_spec, "train", transform)
    model = build_backbone(spec).eval()
    device = choose_device(args.device, 0)
    batch_size = 256 if side <= 64 else 64
    preloaded = torch.stack([dataset[index][0] for index in range(len(dataset))])
    layouts = ("contiguous", "channels_last")

    def bare_rates() -> dict[str, float]:
        return {layout: bare_forward_rate(model, preloaded, batch_size, device, layout == "channels_last")
                for layout in layouts}

    # Bare, pipeline, bare, pipeline, ..., bare: each pipeline run is divided by the mean of the bare forwards
    # just before and after it. The bare forward alone drifts by 10-30 % between runs on a small machine, so a
    # ratio of two best-ofs moves by points from run to run; the median of paired ratios does not.
    bare = [bare_rates()]
    pipeline = []
    for _ in range(args.extraction_rounds):
        extracted = extract_features(model, spec, dataset, batch_size=batch_size, device=args.device,
                                     num_workers=args.extraction_workers, desc="extraction benchmark")
        pipeline.append(extracted.images_per_second)
        bare.append(bare_rates())
    medians = {layout: statistics.median(rates[layout] for rates in bare) for layout in layouts}
    fastest = max(medians, key=medians.get)
    paired = [rate / ((before[fastest] + after[fastest]) / 2) for rate, before, after in zip(pipeline, bare, bare[1:])]
    return {"model": spec.describe(), "data": data_text.split(":")[0], "images": len(dataset), "image_size": side,
            "device": str(device), "rounds": args.extraction_rounds,
            **{f"bare_{layout}_img_s": rate for layout, rate in medians.items()},
            "reference": f"bare {fastest}", "reference_img_s": medians[fastest],
            "extraction_img_s": statistics.median(pipeline), "ratio": statistics.median(paired),
            "ratio_min": min(paired), "ratio_max": max(paired), "paired_ratios": paired}


def extraction_section(args: argparse.Namespace) -> list[dict]:
    """The small generated case, then JPEG files of ImageNet-like sizes through an ImageFolder at 224 px."""
    rows = [extraction_case(args.extraction_model, args.extraction_data, None, args)]
    if args.jpeg_images > 0:
        with tempfile.TemporaryDirectory(prefix="bench_jpegs_") as directory:
            data_text = write_jpeg_folder(Path(directory), args.jpeg_images)
            rows.append(extraction_case(args.jpeg_model, data_text, 224, args))
    return rows


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    report: dict = {"config": {key: str(value) for key, value in vars(args).items()}}
    if not args.skip_knn:
        print(f"k-NN benchmark: {args.n_train} train x {args.n_test} test x {args.dim} dims, {args.num_classes} "
              f"classes, ks {args.ks}, T={args.temperature}, {args.threads} threads")
        report["knn"] = knn_section(args)
        print_table("k-NN: one FAISS search for all ks vs DINO-style search per k", report["knn"])
    if not args.skip_extraction:
        report["extraction"] = extraction_section(args)
        for row in report["extraction"]:
            print(f"\nFeature extraction ({row['model']}, {row['images']} {row['data']} images at "
                  f"{row['image_size']} px, {row['device']}):")
            print(f"  bare forward, contiguous:      {row['bare_contiguous_img_s']:8.1f} img/s (median)")
            print(f"  bare forward, channels_last:   {row['bare_channels_last_img_s']:8.1f} img/s (median)")
            print(f"  mokd extract_features:         {row['extraction_img_s']:8.1f} img/s (median)")
            print(f"  pipeline / fastest bare forward, paired over {row['rounds']} rounds: median "
                  f"{100 * row['ratio']:.1f}% (range {100 * row['ratio_min']:.1f}-{100 * row['ratio_max']:.1f}%, "
                  f"target >= 90%)")
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
