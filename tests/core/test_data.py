"""Tests for mokd.core.data: spec strings, the five dataset kinds, fingerprints, bad images, eval transforms."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from sklearn.datasets import load_digits

from mokd.core import data
from mokd.core.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataSpec,
    eval_transform,
    generate_shapes,
    open_dataset,
    parse_data_spec,
)
from mokd.core.errors import MokdError
from mokd.core.features import extract_features
from mokd.core.registry import resolve_arch

# sha256 of generate_shapes(100) bytes; changes only if the drawing code or numpy's PCG64 stream does
# (then bump data.GENERATOR_VERSION and update this value).
SHAPES_100_SHA256 = "dee421e9928fa2299db095281f84c1751f389782565dc140dfc728324d5f8b9c"


# --- spec strings ------------------------------------------------------------------------------


def test_parse_every_form(tmp_path: Path) -> None:
    folder = parse_data_spec(f"imagefolder:{tmp_path}")
    assert folder == DataSpec("imagefolder", tmp_path.resolve(), None, f"imagefolder:{tmp_path.resolve()}")
    assert folder.native_size is None
    for kind in ("cifar10", "cifar100"):
        spec = parse_data_spec(f"{kind}:{tmp_path}")
        assert (spec.kind, spec.path, spec.native_size) == (kind, tmp_path.resolve(), 32)
    assert parse_data_spec("digits") == DataSpec("digits", None, None, "digits")
    assert parse_data_spec("shapes") == DataSpec("shapes", None, 1000, "shapes:1000")
    assert parse_data_spec(" shapes:200 ") == DataSpec("shapes", None, 200, "shapes:200")
    assert parse_data_spec("shapes:200").native_size == 32


def test_parse_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_data_spec("cifar10:data").text == f"cifar10:{tmp_path.resolve() / 'data'}"


def test_parse_default_comes_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOKD_DATA", raising=False)
    assert parse_data_spec(None).text == "digits"
    monkeypatch.setenv("MOKD_DATA", "shapes:300")
    assert parse_data_spec(None).text == "shapes:300"
    assert parse_data_spec("digits").text == "digits"  # an explicit value wins over the environment
    monkeypatch.setenv("MOKD_DATA", "")
    assert parse_data_spec(None).text == "digits"


@pytest.mark.parametrize(
    "text", ["", "mnist", "imagefolder", "imagefolder:", "cifar10: ", "digits:5", "shapes:many", "shapes:10"]
)
def test_parse_rejects_bad_strings(text: str) -> None:
    with pytest.raises(MokdError) as caught:
        parse_data_spec(text)
    message = str(caught.value)
    assert "\n" not in message
    for form in ("imagefolder:PATH", "cifar10:PATH", "cifar100:PATH", "digits", "shapes:N"):
        assert form in message


# --- digits --------------------------------------------------------------------------------------


def test_digits_total_split_and_balance() -> None:
    spec = parse_data_spec("digits")
    train, val = open_dataset(spec, "train"), open_dataset(spec, "val")
    assert (len(train), len(val)) == (1437, 360)  # sklearn: n_val = ceil(0.2 * 1797)
    per_class = np.bincount(load_digits().target)
    assert np.array_equal(np.bincount(train.targets) + np.bincount(val.targets), per_class)
    assert np.all(np.abs(np.bincount(val.targets) - 0.2 * per_class) <= 1)
    assert train.classes == [str(d) for d in range(10)] and train.num_classes == val.num_classes == 10
    assert train.targets.dtype == np.int64


def _bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """Linear interpolation weights with pixel centres aligned ((i + 0.5) * src / dst - 0.5), edges clamped."""
    position = (np.arange(dst) + 0.5) * src / dst - 0.5
    left = np.floor(position).astype(int)
    frac = position - left
    weights = np.zeros((dst, src))
    np.add.at(weights, (np.arange(dst), np.clip(left, 0, src - 1)), 1 - frac)
    np.add.at(weights, (np.arange(dst), np.clip(left + 1, 0, src - 1)), frac)
    return weights


def test_digits_images_are_upsampled_scans() -> None:
    """Each 32 px image is a bilinear upsampling (to within PIL's 8-bit rounding) of the scan scaled to 0..255,
    with the scan's label, and train + val together use every scan exactly once."""
    digits = load_digits()
    weights = _bilinear_matrix(8, 32)
    scaled = np.rint(digits.images * 255 / 16)
    expected = (weights @ scaled @ weights.T).reshape(len(scaled), -1)
    spec = parse_data_spec("digits")
    used = []
    for split in ("train", "val"):
        dataset = open_dataset(spec, split)
        images = np.stack([np.asarray(dataset[i][0]) for i in range(len(dataset))])
        assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
        assert np.array_equal(images[..., 0], images[..., 2])  # grey in three channels
        grey = images[..., 0].reshape(len(images), -1).astype(float)
        source = torch.cdist(torch.from_numpy(grey), torch.from_numpy(expected)).argmin(1).numpy()
        assert np.abs(grey - expected[source]).max() <= 1
        assert np.array_equal(digits.target[source], dataset.targets)
        used.append(source)
    assert np.array_equal(np.sort(np.concatenate(used)), np.arange(1797))


def test_digits_items_are_pil_rgb_and_transformable() -> None:
    spec = parse_data_spec("digits")
    image, label = open_dataset(spec, "val")[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    assert isinstance(label, int)
    tensor, _ = open_dataset(spec, "val", transform=eval_transform(spec)[0])[0]
    assert tensor.shape == (3, 32, 32)


def test_digits_deterministic_and_fingerprinted() -> None:
    spec = parse_data_spec("digits")
    first, second = open_dataset(spec, "train"), open_dataset(spec, "train")
    assert np.array_equal(np.asarray(first[5][0]), np.asarray(second[5][0]))
    assert first.fingerprint == second.fingerprint
    assert first.fingerprint != open_dataset(spec, "val").fingerprint
    assert len(first.fingerprint) == 16 and int(first.fingerprint, 16) >= 0


# --- shapes --------------------------------------------------------------------------------------


def test_shapes_bytes_are_reproducible() -> None:
    images, labels = generate_shapes.__wrapped__(100)  # bypass the cache: really draw twice
    again, _ = generate_shapes.__wrapped__(100)
    assert images.tobytes() == again.tobytes()
    assert hashlib.sha256(images.tobytes()).hexdigest() == SHAPES_100_SHA256
    assert images.shape == (100, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(labels, np.arange(100) % 10)


def test_shapes_split_classes_and_balance() -> None:
    spec = parse_data_spec("shapes:200")
    train, val = open_dataset(spec, "train"), open_dataset(spec, "val")
    assert (len(train), len(val)) == (160, 40)
    assert np.array_equal(np.bincount(train.targets), [16] * 10)
    assert np.array_equal(np.bincount(val.targets), [4] * 10)
    assert train.classes == list(data.SHAPES_CLASSES) and len(set(train.classes)) == 10
    # the split is a partition of the generated images
    generated, _ = generate_shapes(200)
    split_images = np.concatenate([train._pixels, val._pixels]).reshape(200, -1)
    assert len(np.unique(split_images, axis=0)) == 200
    assert set(map(bytes, split_images)) == set(map(bytes, generated.reshape(200, -1)))
    assert train.fingerprint != open_dataset(parse_data_spec("shapes:300"), "train").fingerprint


def test_shapes_images_vary_within_a_class() -> None:
    """Random colours and positions: the images of one class are far from identical."""
    images, labels = generate_shapes(100)
    circles = images[labels == 0].astype(float)
    assert circles.std(axis=0).mean() > 30


# --- image folders -------------------------------------------------------------------------------


def _write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


CAT, DOG, EEL = (200, 10, 10), (10, 200, 10), (10, 10, 200)


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    for split, count in (("train", 3), ("val", 2)):
        for name, colour in (("cat", CAT), ("dog", DOG)):
            for i in range(count):
                _write_image(root / split / name / f"{i}.png", colour)
    _write_image(root / "train" / "eel" / "0.png", EEL)  # eel has no val images
    return root


def test_imagefolder_labels_and_classes(tiny_folder: Path) -> None:
    spec = parse_data_spec(f"imagefolder:{tiny_folder}")
    train, val = open_dataset(spec, "train"), open_dataset(spec, "val")
    assert train.classes == val.classes == ["cat", "dog", "eel"]
    assert train.num_classes == val.num_classes == 3  # from train, though val has no eel
    assert list(train.targets) == [0, 0, 0, 1, 1, 1, 2] and list(val.targets) == [0, 0, 1, 1]
    colours = {0: CAT, 1: DOG, 2: EEL}
    for dataset in (train, val):
        for index in range(len(dataset)):
            image, label = dataset[index]
            assert image.mode == "RGB" and image.getpixel((3, 3)) == colours[label]


def test_imagefolder_layout_errors(tmp_path: Path, tiny_folder: Path) -> None:
    with pytest.raises(MokdError, match="does not exist.*train/<class>"):
        open_dataset(parse_data_spec(f"imagefolder:{tmp_path / 'nowhere'}"), "train")
    _write_image(tmp_path / "only_train" / "train" / "a" / "0.png", CAT)
    with pytest.raises(MokdError, match="no 'val' folder"):
        open_dataset(parse_data_spec(f"imagefolder:{tmp_path / 'only_train'}"), "train")
    (tmp_path / "no_images" / "train" / "a").mkdir(parents=True)
    (tmp_path / "no_images" / "val").mkdir()
    with pytest.raises(MokdError, match="contains no images"):
        open_dataset(parse_data_spec(f"imagefolder:{tmp_path / 'no_images'}"), "train")
    (tiny_folder / "train" / "gnu").mkdir()
    with pytest.raises(MokdError, match="without images.*gnu"):
        open_dataset(parse_data_spec(f"imagefolder:{tiny_folder}"), "train")
    _write_image(tiny_folder / "val" / "fox" / "0.png", CAT)
    with pytest.raises(MokdError, match="missing from .*train: fox"):
        open_dataset(parse_data_spec(f"imagefolder:{tiny_folder}"), "val")


def test_imagefolder_fingerprint_tracks_files(tiny_folder: Path) -> None:
    spec = parse_data_spec(f"imagefolder:{tiny_folder}")
    before = open_dataset(spec, "train").fingerprint
    assert open_dataset(spec, "train").fingerprint == before
    assert open_dataset(spec, "val").fingerprint != before
    _write_image(tiny_folder / "train" / "dog" / "new.png", DOG)
    assert open_dataset(spec, "train").fingerprint != before


def test_corrupt_image_raises_or_is_skipped(tiny_folder: Path) -> None:
    bad = tiny_folder / "train" / "dog" / "1.png"
    bad.write_bytes(b"this is not a png")
    spec = parse_data_spec(f"imagefolder:{tiny_folder}")
    strict = open_dataset(spec, "train")
    with pytest.raises(MokdError) as caught:
        strict[4]
    assert str(bad) in str(caught.value) and "--skip-bad-images" in str(caught.value)

    transform = eval_transform(spec, image_size=16)[0]
    lenient = open_dataset(spec, "train", transform, skip_bad_images=True)
    assert lenient[4] is None
    channel_means = ChannelMeans()
    result = extract_features(channel_means, resolve_arch("r_tiny"), lenient, batch_size=len(lenient),
                              num_workers=0)
    assert result.skipped == 1 and result.features.shape == (6, 3)
    assert result.labels.tolist() == [0, 0, 0, 1, 1, 2]
    # labels stay aligned with the kept images: each image's dominant channel is its class colour
    assert result.features.argmax(axis=1).tolist() == [0, 0, 0, 1, 1, 2]


class ChannelMeans(torch.nn.Module):
    """A stand-in backbone whose feature is each image's mean colour."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))


# --- CIFAR ---------------------------------------------------------------------------------------


def _fake_cifar10(root: Path, per_batch: int = 4) -> dict[str, np.ndarray]:
    """The python-pickle layout of CIFAR-10 with `per_batch` random images per file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": rows, "labels": labels}, handle)
        written[name] = (rows, labels)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, handle)
    return written


def test_fake_cifar10_loads_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = _fake_cifar10(tmp_path)
    # the fake files cannot match the real archive's MD5 sums that torchvision checks
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    spec = parse_data_spec(f"cifar10:{tmp_path}")
    train, val = open_dataset(spec, "train"), open_dataset(spec, "val")
    assert (len(train), len(val)) == (20, 4)
    assert train.classes == [f"class{i}" for i in range(10)] and train.num_classes == 10
    rows, labels = written["test_batch"]
    assert val.targets.tolist() == labels
    image, label = val[2]
    assert label == labels[2]
    assert np.array_equal(np.asarray(image), rows[2].reshape(3, 32, 32).transpose(1, 2, 0))
    assert train.targets.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])

    before = train.fingerprint
    assert val.fingerprint != before
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    os.utime(batch, ns=(0, 12345))
    assert open_dataset(spec, "train").fingerprint != before


def test_fake_cifar100_uses_fine_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rows = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for name, labels in (("train", [99, 3]), ("test", [42, 7])):
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": rows, "fine_labels": labels, "coarse_labels": [0, 1]}, handle)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": [f"fine{i}" for i in range(100)]}, handle)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    val = open_dataset(parse_data_spec(f"cifar100:{tmp_path}"), "val")
    assert val.targets.tolist() == [42, 7] and val.num_classes == 100 and val.classes[42] == "fine42"


def test_cifar_missing_or_corrupt(tmp_path: Path) -> None:
    with pytest.raises(MokdError, match="cifar-10-batches-py"):
        open_dataset(parse_data_spec(f"cifar10:{tmp_path}"), "train")
    with pytest.raises(MokdError, match="cifar-100-python"):
        open_dataset(parse_data_spec(f"cifar100:{tmp_path}"), "val")
    _fake_cifar10(tmp_path)  # present, but fails torchvision's MD5 check
    with pytest.raises(MokdError, match="MD5"):
        open_dataset(parse_data_spec(f"cifar10:{tmp_path}"), "train")


# --- eval transforms ----------------------------------------------------------------------------


def _normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def test_eval_transform_imagefolder(tmp_path: Path) -> None:
    spec = parse_data_spec(f"imagefolder:{tmp_path}")
    colour = (255, 0, 128)
    image = Image.new("RGB", (400, 300), colour)
    transform, text = eval_transform(spec)
    out = transform(image)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 100, 100], _normalised(colour), atol=1e-5, rtol=0)
    assert text.startswith("Resize(256, bicubic) > CenterCrop(224) > ToTensor > Normalize(")
    assert "0.485" in text and "0.229" in text

    small, small_text = eval_transform(spec, image_size=112)
    assert small(image).shape == (3, 112, 112)
    assert small_text.startswith("Resize(128, bicubic) > CenterCrop(112)")  # 112 * 256 / 224 = 128


def _textured_image(width: int, height: int, seed: int) -> Image.Image:
    """Gradients, a sinusoid and noise: every pixel's resampled value lands somewhere between grey levels."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, 128 + 60 * np.sin(x / 7 + y / 11)], axis=-1)
    rgb += np.random.default_rng(seed).uniform(-40, 40, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


# Landscape and portrait JPEG sizes, downscaled and upscaled, a short side already at 256 (no resize), odd offsets.
@pytest.mark.parametrize("width, height", [(500, 375), (375, 500), (256, 300), (300, 256), (100, 80),
                                           (1000, 230), (224, 224), (257, 999), (90, 60)])
@pytest.mark.parametrize("crop", [224, 96])
def test_resize_center_crop_matches_torchvision(width: int, height: int, crop: int) -> None:
    """The one-box resize == torchvision's Resize(short side, bicubic) > CenterCrop, up to float rounding of the
    filter weights: at most one grey level, on ~1e-4 of the values when downscaling (the ImageNet case) and up to
    ~6e-3 when upscaling an image smaller than the resize (measured on these images)."""
    resize = round(crop * 256 / 224)
    image = _textured_image(width, height, seed=width * height)
    bicubic = T.InterpolationMode.BICUBIC
    expected = np.asarray(T.Compose([T.Resize(resize, interpolation=bicubic), T.CenterCrop(crop)])(image), dtype=int)
    actual = np.asarray(data.ResizeCenterCrop(resize, crop)(image), dtype=int)
    assert actual.shape == expected.shape == (crop, crop, 3)
    difference = np.abs(actual - expected)
    assert difference.max() <= 1
    upscaled = min(width, height) < resize
    assert (difference > 0).mean() < (1e-2 if upscaled else 5e-4)
    if min(width, height) == resize:  # no resampling at all: the crop is torchvision's exactly
        assert difference.max() == 0


def test_resize_center_crop_refuses_a_crop_larger_than_the_resize() -> None:
    with pytest.raises(ValueError, match="must not exceed"):
        data.ResizeCenterCrop(200, 224)


def test_eval_transform_small_datasets() -> None:
    spec = parse_data_spec("shapes:100")
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    transform, text = eval_transform(spec)
    expected = (torch.from_numpy(pixels).permute(2, 0, 1) / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / (
        torch.tensor(IMAGENET_STD)[:, None, None]
    )
    torch.testing.assert_close(transform(Image.fromarray(pixels)), expected, atol=1e-5, rtol=0)
    assert text.startswith("native 32px > ToTensor > Normalize(")
    assert eval_transform(spec, image_size=32)[1] == text

    resize, resize_text = eval_transform(spec, image_size=64)
    assert resize(Image.fromarray(pixels)).shape == (3, 64, 64)
    assert resize_text.startswith("Resize(64x64, bicubic) > ToTensor")
    assert len({text, resize_text, eval_transform(parse_data_spec("imagefolder:/x"))[1]}) == 3


@pytest.mark.parametrize("data_text, image_size", [("imagefolder:/x", None), ("imagefolder:/x", 96),
                                                   ("shapes:100", None), ("shapes:100", 48)])
def test_eval_transform_halves_give_the_same_floats_bit_for_bit(data_text: str, image_size: int | None) -> None:
    """Pixels in the workers + one batch normalisation == torchvision's Compose([..., ToTensor, Normalize])."""
    transform, _ = eval_transform(parse_data_spec(data_text), image_size)
    rng = np.random.default_rng(2)
    side = 32 if data_text.startswith("shapes") else 300
    images = [Image.fromarray(rng.integers(0, 256, size=(side, side + 17 * index, 3), dtype=np.uint8))
              for index in range(3)] if side == 300 else [
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    reference = T.Compose([*transform.steps.transforms, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    expected = torch.stack([reference(image) for image in images])
    assert torch.equal(torch.stack([transform(image) for image in images]), expected)
    pixels = torch.stack([transform.pixels(image) for image in images])
    assert pixels.dtype == torch.uint8 and pixels.shape[-1] == 3
    batch = transform.batch_normalizer(torch.device("cpu"))(pixels)
    assert torch.equal(batch, expected)
    assert batch.is_contiguous(memory_format=torch.channels_last)
