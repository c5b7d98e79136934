"""Feature extraction and its cache."""

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from mokd.core import atomic
from mokd.core.errors import MokdError
from mokd.core.features import FeatureCache, FeatureKind, cached_features, extract_features
from mokd.core.registry import build_backbone, resolve_arch


class RandomImages(Dataset):
    """Fixed random 32 px images; indices in `broken` are unreadable (None), like skip-bad-images mode."""

    def __init__(self, n=10, broken=()):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 32, 32, generator=generator)
        self.labels = torch.arange(n) % 3
        self.broken = set(broken)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return None if index in self.broken else (self.images[index], int(self.labels[index]))


class CountingForward(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, images):
        self.calls += 1
        return self.module(images)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    spec = resolve_arch("vit_t", img_size=32, patch_size=4)
    return spec, build_backbone(spec).eval()


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    spec = resolve_arch("r_tiny")
    return spec, build_backbone(spec).eval()


def test_features_equal_a_direct_forward_in_dataset_order(cnn):
    spec, model = cnn
    data = RandomImages(10)
    result = extract_features(model, spec, data, batch_size=4, num_workers=0)
    with torch.no_grad():
        expected = model(data.images).numpy()
    assert np.allclose(result.features, expected, atol=1e-5)
    assert result.labels.tolist() == data.labels.tolist()
    assert result.skipped == 0 and not result.from_cache


def test_vit_feature_kinds_match_direct_computations(vit):
    spec, model = vit
    data = RandomImages(4)
    with torch.no_grad():
        tokens = model.forward_features(data.images)
        blocks_out, x = [], model.patch_embed(data.images)
        x = model._pos_embed(x)
        for block in model.blocks:
            x = block(x)
            blocks_out.append(model.norm(x)[:, 0])
    cls = extract_features(model, spec, data, num_workers=0).features
    mean = extract_features(model, spec, data, FeatureKind.parse("patch_mean"), num_workers=0).features
    last = extract_features(model, spec, data, FeatureKind.parse("last_cls:4"), num_workers=0).features
    assert np.allclose(cls, tokens[:, 0].numpy(), atol=1e-5)
    assert np.allclose(mean, tokens[:, 1:].mean(1).numpy(), atol=1e-5)
    assert np.allclose(last, torch.cat(blocks_out[-4:], dim=-1).numpy(), atol=1e-5)


def test_feature_kind_parsing_and_cnn_limits(cnn):
    assert FeatureKind.parse("last_cls:4") == FeatureKind("last_cls", 4)
    with pytest.raises(MokdError, match="unknown feature type"):
        FeatureKind.parse("last_cls:x")
    spec, model = cnn
    with pytest.raises(MokdError, match="needs a ViT"):
        extract_features(model, spec, RandomImages(2), FeatureKind.parse("last_cls:2"), num_workers=0)


def test_unreadable_items_are_dropped_and_counted(cnn):
    spec, model = cnn
    result = extract_features(model, spec, RandomImages(10, broken={2, 7}), batch_size=4, num_workers=0)
    assert result.skipped == 2
    assert result.labels.tolist() == [i % 3 for i in range(10) if i not in (2, 7)]


def test_second_run_reads_the_cache_without_a_forward_pass(tmp_path, cnn):
    spec, model = cnn
    counting = CountingForward(model)
    cache = FeatureCache(tmp_path)
    identity = {"checkpoint_sha256": "abc", "split": "train", "fingerprint": "f1"}
    first = cached_features(counting, spec, RandomImages(8), identity=identity, cache=cache, num_workers=0)
    calls = counting.calls
    second = cached_features(counting, spec, RandomImages(8), identity=identity, cache=cache, num_workers=0)
    assert calls > 0 and counting.calls == calls
    assert second.from_cache and np.array_equal(first.features, second.features)
    cached_features(counting, spec, RandomImages(8), identity={**identity, "fingerprint": "f2"}, cache=cache,
                    num_workers=0)
    assert counting.calls > calls  # a different dataset fingerprint is a different entry


def test_fp16_cache_stores_half_precision(tmp_path, cnn):
    spec, model = cnn
    cache = FeatureCache(tmp_path, dtype="float16")
    identity = {"checkpoint_sha256": "abc"}
    cached_features(model, spec, RandomImages(4), identity=identity, cache=cache, num_workers=0)
    hit = cached_features(model, spec, RandomImages(4), identity=identity, cache=cache, num_workers=0)
    assert hit.from_cache and hit.features.dtype == np.float16


def test_killed_write_leaves_no_entry(tmp_path, cnn, monkeypatch):
    spec, model = cnn
    cache = FeatureCache(tmp_path)
    identity = {"checkpoint_sha256": "abc"}

    class Killed(BaseException):
        """Stands in for the process being killed between writing the arrays and the manifest."""

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(atomic, "write_json", killed)
    with pytest.raises(Killed):
        cached_features(model, spec, RandomImages(4), identity=identity, cache=cache, num_workers=0)
    monkeypatch.undo()
    counting = CountingForward(model)
    again = cached_features(counting, spec, RandomImages(4), identity=identity, cache=cache, num_workers=0)
    assert not again.from_cache and counting.calls > 0
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_damaged_entry_is_recomputed(tmp_path, cnn):
    spec, model = cnn
    cache = FeatureCache(tmp_path)
    identity = {"checkpoint_sha256": "abc"}
    cached_features(model, spec, RandomImages(4), identity=identity, cache=cache, num_workers=0)
    next(tmp_path.rglob("*.features.npy")).write_bytes(b"garbage")
    assert not cached_features(model, spec, RandomImages(4), identity=identity, cache=cache,
                               num_workers=0).from_cache


# --- damaged entries, strict runs, worker errors ----------------------------------------------------------

def _damage(kind, paths):
    features_path, labels_path, manifest_path = paths
    if kind == "empty features file":
        features_path.write_bytes(b"")
    elif kind == "manifest {}":
        manifest_path.write_text("{}")
    elif kind == "manifest list":
        manifest_path.write_text("[1, 2]")
    elif kind == "tampered labels":
        labels = np.load(labels_path)
        labels[0] = (labels[0] + 1) % 3
        np.save(labels_path, labels)
    elif kind == "NaN row":
        features = np.load(features_path)
        features[1] = np.nan
        np.save(features_path, features)


@pytest.mark.parametrize("kind", ["empty features file", "manifest {}", "manifest list", "tampered labels", "NaN row"])
def test_damaged_entry_is_reported_discarded_and_recomputed(tmp_path, cnn, capsys, kind):
    spec, model = cnn
    cache = FeatureCache(tmp_path)
    identity = {"checkpoint_sha256": "abc"}
    first = cached_features(model, spec, RandomImages(6), identity=identity, cache=cache, num_workers=0)
    manifest = next(tmp_path.rglob("*.json"))
    key = manifest.name.removesuffix(".json")
    _damage(kind, cache._paths(key))
    counting = CountingForward(model)
    again = cached_features(counting, spec, RandomImages(6), identity=identity, cache=cache, num_workers=0)
    assert not again.from_cache and counting.calls > 0
    assert np.allclose(again.features, first.features) and np.array_equal(again.labels, first.labels)
    assert f"feature cache entry {manifest} is damaged" in capsys.readouterr().err
    hit = cached_features(counting, spec, RandomImages(6), identity=identity, cache=cache, num_workers=0)
    assert hit.from_cache  # the recomputed entry replaced the damaged one


def test_labels_are_checked_against_the_dataset(tmp_path, cnn, capsys):
    spec, model = cnn
    cache = FeatureCache(tmp_path)
    data = RandomImages(6)
    data.targets = data.labels.numpy().astype(np.int64)
    cached_features(model, spec, data, identity={"id": 1}, cache=cache, num_workers=0)
    data.targets = (data.targets + 1) % 3  # the dataset's labels changed under the same identity
    assert not cached_features(model, spec, data, identity={"id": 1}, cache=cache, num_workers=0).from_cache
    assert "labels differ from the dataset's" in capsys.readouterr().err


def _folder_with_a_corrupt_image(root):
    from PIL import Image

    for split in ("train", "val"):
        for label, colour in (("a", (200, 0, 0)), ("b", (0, 200, 0))):
            for index in range(3):
                path = root / split / label / f"{index}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), colour).save(path)
    bad = root / "train" / "b" / "1.png"
    bad.write_bytes(b"not an image")
    return bad


def test_a_strict_run_never_reuses_features_extracted_while_skipping(tmp_path, cnn):
    from mokd.core.data import eval_transform, open_dataset, parse_data_spec

    spec, model = cnn
    bad = _folder_with_a_corrupt_image(tmp_path / "images")
    data = parse_data_spec(f"imagefolder:{tmp_path / 'images'}")
    transform = eval_transform(data, 32)[0]
    cache = FeatureCache(tmp_path / "cache")
    identity = {"checkpoint_sha256": "abc"}
    lenient = open_dataset(data, "train", transform, skip_bad_images=True)
    skipped = cached_features(model, spec, lenient, identity=identity, cache=cache, num_workers=0)
    assert skipped.skipped == 1
    assert cached_features(model, spec, lenient, identity=identity, cache=cache, num_workers=0).from_cache
    strict = open_dataset(data, "train", transform)
    with pytest.raises(MokdError, match=f"cannot read image {bad}"):
        cached_features(model, spec, strict, identity=identity, cache=cache, num_workers=0)


@pytest.mark.slow  # spawns a DataLoader worker (whose shutdown waits up to 5 s)
def test_an_unreadable_image_reads_the_same_with_and_without_workers(tmp_path, cnn):
    from mokd.core.data import eval_transform, open_dataset, parse_data_spec

    spec, model = cnn
    _folder_with_a_corrupt_image(tmp_path / "images")
    data = parse_data_spec(f"imagefolder:{tmp_path / 'images'}")
    strict = open_dataset(data, "train", eval_transform(data, 32)[0])
    messages = []
    for workers in (0, 1):
        with pytest.raises(MokdError) as caught:
            extract_features(model, spec, strict, batch_size=2, num_workers=workers)
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and "\n" not in messages[1] and "Traceback" not in messages[1]


@pytest.mark.parametrize("which", ["cnn", "vit"])
@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])  # a worker process: slow
def test_image_folder_features_equal_a_forward_on_the_transformed_images(tmp_path, which, workers, request):
    """The extractor normalises whole batches itself under the evaluation transform; the features must be those of
    the plain per-image transform (JPEGs of odd sizes, the folder path users hit)."""
    from PIL import Image

    from mokd.core.data import eval_transform, open_dataset, parse_data_spec

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for index in range(5):
            folder = tmp_path / split / f"class{index % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, size=(40 + 3 * index, 52, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)
    spec_data = parse_data_spec(f"imagefolder:{tmp_path}")
    transform, _ = eval_transform(spec_data, image_size=32)
    dataset = open_dataset(spec_data, "train", transform)
    spec, model = request.getfixturevalue(which)
    result = extract_features(model, spec, dataset, batch_size=2, num_workers=workers)
    images = torch.stack([dataset[index][0] for index in range(len(dataset))])
    with torch.inference_mode():
        expected = model.to(memory_format=torch.contiguous_format)(images).numpy()
    assert np.allclose(result.features, expected, atol=1e-5)
    assert result.labels.tolist() == list(dataset.targets)


def test_default_loading_is_threads_for_image_files_and_a_worker_for_memory_on_cpu(tmp_path, cnn, monkeypatch):
    """The CPU default follows the cost of an item: files are decoded by threads between forwards (no worker
    process stalling the forward), in-memory images come from `extraction_workers`' worker processes."""
    from PIL import Image

    from mokd.core import features
    from mokd.core.data import eval_transform, open_dataset, parse_data_spec
    from mokd.core.resources import available_cores, extraction_workers

    for split in ("train", "val"):
        for index in range(2):
            folder = tmp_path / split / f"class{index}"
            folder.mkdir(parents=True)
            Image.new("RGB", (40, 30), (index * 200, 10, 10)).save(folder / "0.jpg")
    chosen = []
    monkeypatch.setattr(features, "_batches", lambda shard, batch_size, num_workers, device: (
        chosen.append(num_workers) or features._threaded_batches(shard, batch_size, 1)))
    spec, model = cnn
    for data_text in (f"imagefolder:{tmp_path}", "shapes:50"):
        data_spec = parse_data_spec(data_text)
        dataset = open_dataset(data_spec, "train", eval_transform(data_spec, image_size=32)[0])
        assert dataset.decodes_files == (data_spec.kind == "imagefolder")
        extract_features(model, spec, dataset, device="cpu")
    assert chosen == [0, extraction_workers(available_cores(), "cpu")]
